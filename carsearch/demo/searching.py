"""Searches as the page and the API ask for them: a decoded photo, k, the confidence and the car to search.

Every search goes through the backend's :class:`~carsearch.demo.batching.Batcher`: searches arriving together
share one detector call (all photos) and one embedder call (the chosen cars' crops) per index; each then looks
up its own hits. No GradCAM here: explanations are separate requests (:mod:`carsearch.demo.explaining`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from carsearch.demo.backend import BATCH_WINDOW_S, MAX_BATCH, MAX_K, DemoBackend, Side, release_memory
from carsearch.demo.batching import Batcher
from carsearch.errors import CarSearchError
from carsearch.pipeline.queries import QueryCars, embed_cars, gallery_hits, plan_cars
from carsearch.types import SearchHit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchRequest:
    """One search. ``car``: the car's number in the photo (1 = the largest); None: the largest. ``cars``: the main
    index's cars of this photo at this confidence from an earlier search, used as they are (not detected again),
    so a car picked by its number is the car that was shown under that number."""

    image: Image.Image
    k: int = 5
    confidence: float | None = None
    car: int | None = None
    cars: QueryCars | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise CarSearchError(f"k must be between 1 and {MAX_K}, got {self.k}")
        if self.car is not None and self.car < 1:
            raise CarSearchError(f"car numbers start at 1, got {self.car}")


@dataclass(frozen=True)
class SideAnswer:
    """One index's answer: every car of the photo (``cars``), the number searched (``car``) and its hits."""

    side: Side
    cars: QueryCars
    car: int
    hits: tuple[SearchHit, ...]


@dataclass(frozen=True)
class CarSearch:
    """The answer to one :class:`SearchRequest`: the main index's and, when loaded, the raw index's."""

    main: SideAnswer
    raw: SideAnswer | None
    timings_ms: dict[str, float] = field(default_factory=dict)


def _car_count_error(cars: QueryCars, car: int) -> CarSearchError:
    found = sum(plan.detection is not None for plan in cars.plans)
    return CarSearchError(f"there is no car {car} in this photo: it has {found} (numbered 1–{max(found, 1)})")


def _plan(side: Side, requests: Sequence[SearchRequest], main: bool) -> list[QueryCars]:
    """Every request's cars for ``side``: the main index reuses a request's known cars, detects the others (one
    detector call); the raw index has no confidence of its own."""
    known = [r.cars if main else None for r in requests]
    todo = [i for i, cars in enumerate(known) if cars is None]
    confidences = [requests[i].confidence if main else None for i in todo]
    detected = iter(plan_cars(side.pipeline.models, [requests[i].image for i in todo], confidences))
    return [cars if cars is not None else next(detected) for cars in known]


def search_batch(backend: DemoBackend, requests: Sequence[SearchRequest]) -> list[CarSearch | CarSearchError]:
    """Answer ``requests`` together: per index one detector call and one embedder call for the whole batch.

    A request for a car the photo does not have gets a :class:`CarSearchError` in its place.
    """
    answers: dict[str, list[SideAnswer | CarSearchError]] = {}
    timings = {"detect": 0.0, "embed": 0.0, "search": 0.0}
    for side in backend.sides:
        tic = time.perf_counter()
        cars = _plan(side, requests, side is backend.main)
        timings["detect"] += (time.perf_counter() - tic) * 1000
        picks = [(r.car or 1) if side is backend.main else 1 for r in requests]
        ok = [i for i, (c, n) in enumerate(zip(cars, picks, strict=True)) if n <= len(c.plans)]
        tic = time.perf_counter()
        vectors = embed_cars(side.pipeline.models, [cars[i] for i in ok], [picks[i] for i in ok])
        timings["embed"] += (time.perf_counter() - tic) * 1000
        tic = time.perf_counter()
        row = {i: j for j, i in enumerate(ok)}
        answers[side.name] = [
            SideAnswer(side, c, n, gallery_hits(side.pipeline.models, side.gallery, vectors[row[i]], r.k))
            if i in row
            else _car_count_error(c, n)
            for i, (r, c, n) in enumerate(zip(requests, cars, picks, strict=True))
        ]
        timings["search"] += (time.perf_counter() - tic) * 1000
    logger.info("batch of %d searches: %s", len(requests), {k: round(v) for k, v in timings.items()})
    out: list[CarSearch | CarSearchError] = []
    for i in range(len(requests)):
        main = answers[backend.main.name][i]
        raw = answers[backend.raw.name][i] if backend.raw is not None else None
        if isinstance(main, CarSearchError):
            out.append(main)
            continue
        out.append(CarSearch(main, raw if isinstance(raw, SideAnswer) else None, dict(timings)))
    return out


def batcher_for(backend: DemoBackend) -> Batcher[SearchRequest, CarSearch]:
    """The backend's search queue, started on first use."""
    with backend.lock:
        if backend.batcher is None:
            backend.batcher = Batcher(
                lambda requests: search_batch(backend, requests),
                MAX_BATCH,
                BATCH_WINDOW_S,
                name="carsearch-search",
                on_idle=release_memory,
            )
        return backend.batcher


def ask(backend: DemoBackend, request: SearchRequest) -> CarSearch:
    """One search through the backend's queue (batched with any others waiting); timings include the wait."""
    tic = time.perf_counter()
    answer = batcher_for(backend)(request)
    return waited(answer, (time.perf_counter() - tic) * 1000)


def waited(answer: CarSearch, total_ms: float) -> CarSearch:
    """``answer`` with its time in the queue (``total_ms`` from submitting, less the batch's work) and total."""
    queued = max(0.0, total_ms - sum(answer.timings_ms.values()))
    return CarSearch(answer.main, answer.raw, {**answer.timings_ms, "queue": queued, "total": total_ms})
