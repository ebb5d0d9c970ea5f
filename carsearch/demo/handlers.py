"""The demo's logic as plain functions over the pipeline: an upload in, pictures and captions out.

``DemoBackend.load`` loads every model once; ``search`` and ``explain_hit`` answer one request each. Bad
uploads (not an image, no car) come back as a message, not an exception; other errors raise and the app
shows them for that request and keeps serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from carsearch.config import DetectorConfig
from carsearch.data.cropping import apply_plan
from carsearch.data.images import decode_image, read_bytes
from carsearch.data.storage import is_uri
from carsearch.errors import CarSearchError, IndexMismatchError
from carsearch.explain import Explainer, energy_in_box, paste_into
from carsearch.explain.cam import Method
from carsearch.explain.render import draw_box, overlay
from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline
from carsearch.pipeline.cam_jobs import load_item_crop
from carsearch.types import FLAG_LOW_CONFIDENCE, FLAG_NO_DETECTION, BBox, CropPlan, SearchResult

logger = logging.getLogger(__name__)

DISPLAY_MIN_SIDE = 384
CROP_MIN_SIDE = 256
DETECTOR_FLOOR = 0.05  # the detector runs at this confidence; the slider filters above it
Caption = tuple[Image.Image, str]


@dataclass
class Side:
    """One index and the pipeline that queries it exactly as it was built."""

    name: str
    pipeline: Pipeline
    gallery: GalleryIndex
    explainer: Explainer


def _side(name: str, index: str | Path, overrides: list[str], method: Method, share: Side | None = None) -> Side:
    pipeline = Pipeline.for_index(index, overrides)
    gallery = None
    if share is not None:  # same embedder for both indexes: load it once
        shared = Pipeline(pipeline.config, embedder=share.pipeline.embedder)
        try:
            pipeline, gallery = shared, shared.open_index(index)
        except IndexMismatchError:
            pass  # another embedder: this index gets its own
    if gallery is None:
        gallery = pipeline.open_index(index)
    if pipeline.config.crop:
        _ = pipeline.detector  # load now, not on the first request
    return Side(name, pipeline, gallery, Explainer(pipeline.embedder, method))


@dataclass
class DemoBackend:
    """The loaded models and indexes: ``main`` (usually cropped) and an optional ``raw`` index."""

    main: Side
    raw: Side | None = None
    default_confidence: float = DetectorConfig().confidence

    @classmethod
    def load(
        cls,
        index: str | Path,
        raw_index: str | Path | None = None,
        model: str | None = None,
        overrides: list[str] | None = None,
        method: Method = "gradcam",
    ) -> DemoBackend:
        """Load the index(es) and their models once (``model``: the model both indexes were built with, where
        the manifest's path no longer finds it; by default each index's own)."""
        extra = list(overrides or []) + ([f"embedder.model={model}"] if model else [])
        default_confidence = Pipeline.for_index(index, extra).config.detector.confidence
        main = _side("cropped", index, [*extra, f"detector.confidence={DETECTOR_FLOOR}"], method)
        raw = _side("raw", raw_index, extra, method, share=main) if raw_index else None
        if not len(main.gallery):
            raise CarSearchError(f"index {index} is empty: add images with `carsearch index` first")
        return cls(main, raw, default_confidence)

    def examples(self, count: int = 8) -> list[str]:
        """Paths of up to ``count`` indexed images, one per label where possible, that still exist (local files
        only: Gradio's examples cannot read an object store)."""
        seen: set[str | None] = set()
        picked: list[str] = []
        for record in self.main.gallery.records:
            if len(picked) >= count:
                break
            if record.label in seen or is_uri(record.path) or not Path(record.path).is_file():
                continue
            seen.add(record.label)
            picked.append(record.path)
        return picked


@dataclass
class QueryState:
    """What a search leaves behind for explaining another hit: the query crop and the hit crops."""

    crop: Image.Image | None = None
    hits: list[Caption] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)  # hits whose gallery file could not be read


@dataclass
class SearchOutput:
    """Everything the page shows after a search. ``error`` set → only the message is meaningful."""

    message: str
    annotated: Image.Image | None = None
    crop: Image.Image | None = None
    hits: list[Caption] = field(default_factory=list)
    query_cam: Image.Image | None = None
    hit_cam: Image.Image | None = None
    cam_caption: str = ""
    raw_hits: list[Caption] = field(default_factory=list)
    photo_cams: list[Caption] = field(default_factory=list)
    attention: str = ""
    state: QueryState = field(default_factory=QueryState)
    error: str | None = None


def read_upload(path: str | Path | None) -> Image.Image:
    """Decode an uploaded file (any format PIL reads; grayscale/CMYK/alpha → RGB), or raise ``CarSearchError``."""
    if not path:
        raise CarSearchError("upload a car photo first")
    return decode_image(read_bytes(path))


def _hits(result: SearchResult) -> list[Caption]:
    out = []
    for hit in result.hits:
        try:
            image = load_item_crop(hit.metadata or {"path": hit.path})
        except CarSearchError as exc:  # the gallery file moved: show a placeholder, keep the rank
            logger.warning("cannot show hit %s: %s", hit.path, exc)
            image = Image.new("RGB", (64, 48), (200, 200, 200))
            image.info["missing"] = True
        out.append((image, f"#{hit.rank} {hit.label or 'unlabelled'} · {hit.score:.3f}"))
    return out


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


def _display(image: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """Small pictures upscaled so boxes and heat maps stay readable in the page."""
    scale = min_side / max(image.size)
    if scale <= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def _photo_cam(side: Side, image: Image.Image, plan: CropPlan, box: BBox | None) -> tuple[Image.Image, float | None]:
    """The side's own-embedding CAM over the whole photo (crop maps pasted back), and its energy in ``box``."""
    cam = paste_into(side.explainer.heatmaps([apply_plan(image, plan)])[0], plan.region, image.width, image.height)
    picture = _display(overlay(image, cam))
    if box is not None:
        picture = draw_box(picture, box.scale(picture.width / image.width), label="car")
    return picture, (energy_in_box(cam, box) if box is not None else None)


def search(
    backend: DemoBackend, upload: str | Path | None, k: int = 5, confidence: float | None = None
) -> SearchOutput:
    """Detect, crop, search the index(es) and explain the top hit; bad input gives a message, not an exception."""
    confidence = backend.default_confidence if confidence is None else float(confidence)
    try:
        image = read_upload(upload)
    except CarSearchError as exc:
        return SearchOutput(message=f"⚠️ Could not use that upload: {exc}", error=f"Could not use that upload: {exc}")
    main = backend.main
    result = main.pipeline.search(main.gallery, image, k=int(k), min_score=confidence)
    plan, crop = result.query_plan, result.query_crop  # the crop embedded (from the photo prepared as the gallery's)
    hits = _hits(result)
    box = plan.detection.box if plan.detection else None
    message = _message(plan, confidence, len(hits))
    if not main.pipeline.config.retrieval.plain:
        message += f" Post-processed: {main.pipeline.config.retrieval.describe()}."
    out = SearchOutput(message=message, crop=_display(crop, CROP_MIN_SIDE), hits=hits)
    shown = _display(image)
    out.annotated = (
        draw_box(
            shown, box.scale(shown.width / image.width), label=f"{plan.detection.class_name} {plan.detection.score:.2f}"
        )
        if box and plan.detection
        else shown
    )
    missing = {i for i, (image, _) in enumerate(hits) if image.info.get("missing")}
    out.state = QueryState(crop, hits, missing)
    if hits and 0 not in missing:
        out.query_cam, out.hit_cam, out.cam_caption = explain_hit(backend, out.state, 0)
    cams, lines = [], []
    sides = [main] if backend.raw is None else [backend.raw, main]
    for side in sides:
        side_plan = plan
        if side is not main:
            side_result = side.pipeline.search(side.gallery, image, k=int(k))
            out.raw_hits = _hits(side_result)
            side_plan = side_result.query_plan
        picture, share = _photo_cam(side, image, side_plan, box)
        cams.append((picture, f"{side.name} index: where the model looks"))
        if share is not None:
            lines.append(f"{side.name}: **{share:.0%}** of the attention inside the car box")
    out.photo_cams = cams
    out.attention = "Attention-in-box — " + "; ".join(lines) if lines else "Attention-in-box: no car box known."
    return out


def explain_hit(backend: DemoBackend, state: QueryState, index: int) -> tuple[Image.Image, Image.Image, str]:
    """GradCAM overlays of the query crop w.r.t. hit ``index`` and of that hit w.r.t. the query."""
    if state.crop is None or not 0 <= index < len(state.hits):
        raise CarSearchError("search first, then pick a result")
    if index in state.missing:
        raise CarSearchError("that result's image file is missing from the gallery: nothing to explain")
    hit_image, caption = state.hits[index]
    query_map, hit_map, _ = backend.main.explainer.pair(state.crop, hit_image)
    method = backend.main.explainer.method
    pictures = (
        _display(overlay(state.crop, query_map), CROP_MIN_SIDE),
        _display(overlay(hit_image, hit_map), CROP_MIN_SIDE),
    )
    return *pictures, f"{method}: query ↔ {caption}"
