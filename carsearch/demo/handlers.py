"""The page's answers as plain data: an upload in, the numbered cars, the searched crop and the hits out.

``search`` answers first (box, crop, hits: detection, one embedding and the index lookup, batched with other
users' searches); the GradCAM maps follow in :mod:`carsearch.demo.explaining`. Bad uploads (not an image, too
big, no car) come back as a message, not an exception; other errors raise and the app shows them for that
request and keeps serving.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from carsearch.data.images import decode_image, read_image_bytes
from carsearch.demo.backend import MAX_UPLOAD_BYTES, DemoBackend, Side
from carsearch.demo.searching import CarSearch, SearchRequest, ask
from carsearch.errors import CarSearchError
from carsearch.explain.render import draw_box
from carsearch.pipeline.cam_jobs import load_item_crop
from carsearch.pipeline.queries import QueryCars
from carsearch.types import FLAG_LOW_CONFIDENCE, FLAG_NO_DETECTION, CropPlan, SearchHit

__all__ = ["DemoBackend", "QueryState", "SearchOutput", "Side", "pick_car", "read_upload", "search"]

logger = logging.getLogger(__name__)

DISPLAY_MIN_SIDE = 384  # small pictures are shown upscaled to this
DISPLAY_MAX_SIDE = 1024  # large ones downscaled to this (the page never needs more; encoding is cheaper)
CROP_MIN_SIDE = 256
OTHER_CAR = (255, 160, 0)  # the cars not searched; the searched one is drawn in the box colour (green)
Caption = tuple[Image.Image, str]


@dataclass
class QueryState:
    """What a search leaves behind for the maps and for picking another car (pictures and plans, no models).

    ``views``: per index searched (main first), its name, the photo as prepared for it and the car searched.
    ``scale``: shown picture's pixels per prepared-photo pixel (a click's position → a car).
    """

    crop: Image.Image | None = None
    hits: list[Caption] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)  # hits whose gallery file could not be read
    views: list[tuple[str, QueryCars, int]] = field(default_factory=list)
    scale: float = 1.0
    source: str | None = None  # the upload searched, and at which confidence: another car of it needs no detection
    confidence: float | None = None

    def known_cars(self, upload: str | Path | None, confidence: float) -> QueryCars | None:
        """The main index's cars of ``upload`` when this state searched that upload at ``confidence``, else None."""
        if not self.views or upload is None or self.source != str(upload) or self.confidence != confidence:
            return None
        return self.views[0][1]


@dataclass
class SearchOutput:
    """Everything the page shows after a search. ``error`` set → only the message is meaningful.

    ``cars``: the numbers of the cars found (1 = the largest); ``car``: the one searched.
    """

    message: str
    annotated: Image.Image | None = None
    crop: Image.Image | None = None
    hits: list[Caption] = field(default_factory=list)
    raw_hits: list[Caption] = field(default_factory=list)
    cars: list[int] = field(default_factory=list)
    car: int | None = None
    state: QueryState = field(default_factory=QueryState)
    error: str | None = None


def read_upload(path: str | Path | None) -> Image.Image:
    """Decode an uploaded file (any format PIL reads; grayscale/CMYK/alpha → RGB), or raise ``CarSearchError``.

    Files over ``MAX_UPLOAD_BYTES`` are refused before reading, pictures over the pixel limit before decoding.
    """
    if not path:
        raise CarSearchError("upload a car photo first")
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0  # read_image_bytes says why it cannot be read
    if size > MAX_UPLOAD_BYTES:
        raise CarSearchError(f"file too large: {size / 2**20:.1f} MiB > {MAX_UPLOAD_BYTES / 2**20:.0f} MiB")
    return decode_image(read_image_bytes(path))


def hit_pictures(hits: tuple[SearchHit, ...]) -> list[Caption]:
    """Each hit's indexed crop with its caption (``#rank label · score``); a grey placeholder for a lost file."""
    out = []
    for hit in hits:
        try:
            image = load_item_crop(hit.metadata or {"path": hit.path})
        except CarSearchError as exc:  # the gallery file moved: show a placeholder, keep the rank
            logger.warning("cannot show hit %s: %s", hit.path, exc)
            image = Image.new("RGB", (64, 48), (200, 200, 200))
            image.info["missing"] = True
        out.append((image, f"#{hit.rank} {hit.label or 'unlabelled'} · {hit.score:.3f}"))
    return out


def cars_found(cars: QueryCars) -> int:
    """How many numbered cars the photo has (a whole-image plan is no car)."""
    return sum(plan.detection is not None for plan in cars.plans)


def _message(plan: CropPlan, confidence: float, hits: int) -> str:
    if FLAG_NO_DETECTION in plan.flags:
        return f"**No car found** (confidence ≥ {confidence:.2f}): searched with the whole image. {hits} results."
    if plan.detection is None:
        return f"Searched with the whole image (raw index). {hits} results."
    det = plan.detection
    if FLAG_LOW_CONFIDENCE in plan.flags:
        return (
            f"No car reached confidence {confidence:.2f}: searched with the most confident box, a "
            f"**{det.class_name}** ({det.score:.2f}). {hits} results."
        )
    return f"Found a **{det.class_name}** (confidence {det.score:.2f}); searched with its crop. {hits} results."


def fit(image: Image.Image, min_side: int = DISPLAY_MIN_SIDE, max_side: int = DISPLAY_MAX_SIDE) -> Image.Image:
    """The picture as the page shows it: small ones upscaled (boxes and maps stay readable), large ones down."""
    longest = max(image.size)
    scale = min_side / longest if longest < min_side else min(1.0, max_side / longest)
    if scale == 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def numbered(cars: QueryCars, car: int) -> tuple[Image.Image, float]:
    """The photo as shown, every car boxed with its number (the searched one green, with class and score), and
    the shown picture's scale w.r.t. ``cars.image``."""
    shown = fit(cars.image)
    scale = shown.width / cars.image.width
    for number, plan in enumerate(cars.plans, start=1):
        if plan.detection is not None and number != car:
            shown = draw_box(shown, plan.detection.box.scale(scale), colour=OTHER_CAR, label=str(number))
    det = cars.plans[car - 1].detection
    if det is not None:  # the searched car last: on top of the others
        shown = draw_box(shown, det.box.scale(scale), label=f"{car}: {det.class_name} {det.score:.2f}")
    return shown, scale


def search(
    backend: DemoBackend,
    upload: str | Path | None,
    k: int = 5,
    confidence: float | None = None,
    car: int | None = None,
    last: QueryState | None = None,
) -> SearchOutput:
    """Detect every car, search with car ``car`` (None: the largest) and show box, crop and hits — no maps.
    ``last``: the page's previous search; when it searched this upload at this confidence, its cars are reused
    (car ``car`` is the one shown under that number, not detected again)."""
    confidence = backend.default_confidence if confidence is None else float(confidence)
    known = last.known_cars(upload, confidence) if last is not None else None
    try:
        image = backend.prepare(read_upload(upload))
        answer: CarSearch = ask(backend, SearchRequest(image, int(k), confidence, car, known))
    except CarSearchError as exc:
        return SearchOutput(message=f"⚠️ Could not use that upload: {exc}", error=f"Could not use that upload: {exc}")
    main = answer.main
    plan = main.cars.plans[main.car - 1]
    hits = hit_pictures(main.hits)
    message = _message(plan, confidence, len(hits))
    count = cars_found(main.cars)
    if count > 1:
        message += f" Car {main.car} of {count}: click another box on the picture (or pick its number) to search it."
    if not main.side.pipeline.config.retrieval.plain:
        message += f" Post-processed: {main.side.pipeline.config.retrieval.describe()}."
    crop = main.cars.crop(main.car)
    annotated, scale = numbered(main.cars, main.car)
    missing = {i for i, (picture, _) in enumerate(hits) if picture.info.get("missing")}
    views = [(a.side.name, a.cars, a.car) for a in (main, answer.raw) if a is not None]
    return SearchOutput(
        message=message,
        annotated=annotated,
        crop=fit(crop, CROP_MIN_SIDE),
        hits=hits,
        raw_hits=hit_pictures(answer.raw.hits) if answer.raw is not None else [],
        cars=list(range(1, count + 1)),
        car=main.car if count else None,
        state=QueryState(crop, hits, missing, views, scale, None if upload is None else str(upload), confidence),
    )


def pick_car(state: QueryState, x: float, y: float) -> int | None:
    """The number of the car whose box holds the point (x, y) of the shown picture (the smallest such box, so a
    car in front of a bigger one can be picked); None when the point is on no car."""
    if not state.views:
        return None
    _, cars, _ = state.views[0]
    px, py = x / state.scale, y / state.scale
    inside = [
        (plan.detection.box.area, number)
        for number, plan in enumerate(cars.plans, start=1)
        if plan.detection is not None
        and plan.detection.box.x1 <= px <= plan.detection.box.x2
        and plan.detection.box.y1 <= py <= plan.detection.box.y2
    ]
    return min(inside)[1] if inside else None
