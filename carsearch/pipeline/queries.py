"""Many queries at once, every car of each: one detector call for the photos, one embedder call for the crops.

What :meth:`~carsearch.pipeline.Pipeline.search` does for one photo and its largest car, for a batch of photos
and any of their cars (the demo's batched searches). Each photo is prepared exactly as a gallery image (see
:meth:`~carsearch.pipeline.Pipeline.embed_image`), so car 1 of a photo gets the vector ``search`` gives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from carsearch.config import PipelineConfig
from carsearch.data.cropping import apply_plan, needs_detector, plan_image
from carsearch.data.images import limit_size
from carsearch.index import GalleryIndex
from carsearch.pipeline.loaded_models import Models
from carsearch.types import CropPlan, SearchHit


@dataclass(frozen=True)
class QueryCars:
    """One query photo as the gallery's images are prepared, and every car found in it.

    ``image``: the photo downscaled to ``runtime.max_image_side`` (``scale`` = its size / the original's);
    ``plans`` in ``image``'s pixels, largest car first (car number n is ``plans[n - 1]``); a photo without a
    usable box (or a raw index) has one whole-image plan.
    """

    image: Image.Image
    scale: float
    plans: tuple[CropPlan, ...]

    def crop(self, car: int) -> Image.Image:
        """The pixels embedded for car number ``car`` (1-based)."""
        return apply_plan(self.image, self.plans[car - 1])


def plan_cars(models: Models, images: Sequence[Image.Image], min_scores: Sequence[float | None]) -> list[QueryCars]:
    """Every car of each RGB photo, largest first, from one detector call over the batch.

    ``min_scores[i]``: photo i's detector confidence, above the config's (the demo's slider); the fallback box
    below it still applies, as in :meth:`~carsearch.pipeline.Pipeline.plan`.
    """
    config = models.config
    prepared = [limit_size(image, config.runtime.max_image_side) for image in images]
    detections = (
        models.detector.detect([small for small, _ in prepared]) if needs_detector(config, None) and images else None
    )
    every_car = dataclasses.replace(config, detector=dataclasses.replace(config.detector, selection="all"))
    out = []
    for i, ((small, scale), min_score) in enumerate(zip(prepared, min_scores, strict=True)):
        plans = plan_image(
            at_min_score(every_car, min_score),
            small.width,
            small.height,
            detections[i] if detections is not None else None,
        )
        out.append(QueryCars(small, scale, tuple(plans)))
    return out


def at_min_score(config: PipelineConfig, min_score: float | None) -> PipelineConfig:
    """``config`` with ``detector.confidence`` raised to ``min_score`` for one query (the demo's slider); the
    fallback box below it still applies."""
    if min_score is None:
        return config
    detector = dataclasses.replace(config.detector, confidence=max(config.detector.confidence, min_score))
    return dataclasses.replace(config, detector=detector)


def embed_cars(models: Models, queries: Sequence[QueryCars], cars: Sequence[int]) -> np.ndarray:
    """(N, D) L2-normalised vectors of car ``cars[i]`` (1-based) of ``queries[i]``, in one embedder call."""
    return models.embedder.embed([query.crop(car) for query, car in zip(queries, cars, strict=True)])


def gallery_hits(
    models: Models, gallery: GalleryIndex, vector: np.ndarray, k: int, exclude: set[int] | None = None
) -> tuple[SearchHit, ...]:
    """The top-``k`` hits of one (D,) vector, with the config's retrieval post-processing; ``exclude``: item
    ids never returned."""
    scores, ids = gallery.retrieve(vector[None], k, models.config.retrieval, exclude=[exclude] if exclude else None)
    hits: list[SearchHit] = []
    for score, item_id in zip(scores[0], ids[0], strict=True):
        if item_id < 0 or len(hits) >= k:
            continue
        record = gallery.records[int(item_id)]
        hits.append(SearchHit(len(hits) + 1, int(item_id), float(score), record.label, record.path, record.to_dict()))
    return tuple(hits)
