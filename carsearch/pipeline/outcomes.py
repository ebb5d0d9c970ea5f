"""What becomes of each image in the batch job, whatever the engine: detect + crop decoded images, attach
embeddings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from carsearch.data.cropping import apply_plan, needs_detector, plan_image, plan_in_original
from carsearch.data.decode import Decoded
from carsearch.index.records import ItemRecord
from carsearch.pipeline.loaded_models import Models
from carsearch.types import BBox


@dataclass
class Outcome:
    """What became of one source image: ``skip`` (indexed, unchanged), ``error`` (``error`` says why) or
    ``ok`` with its items (one record per crop; ``vectors`` (n, D) once embedded)."""

    path: str
    status: str
    records: list[ItemRecord] = field(default_factory=list)
    vectors: np.ndarray | None = None
    error: dict[str, Any] | None = None


def crop_decoded(
    models: Models, batch: list[Decoded], timings: dict[str, float]
) -> tuple[list[Outcome], list[Image.Image]]:
    """Detect (where needed) and crop a batch of decoded images.

    Returns one :class:`Outcome` per image in batch order (records, no vectors yet) and the crops to embed,
    in the order of the ok outcomes' records. ``timings["detect"]`` accumulates detector seconds.
    """
    config = models.config
    outcomes: list[Outcome] = []
    good: list[tuple[Outcome, Decoded, Image.Image, BBox | None]] = []
    for entry in batch:
        path = str(entry.item.path)
        if entry.status == "skip":
            outcomes.append(Outcome(path, "skip"))
        elif entry.status == "error":
            error = {"path": path, "reason": entry.reason, "content_hash": entry.content_hash}
            outcomes.append(Outcome(path, "error", error=error))
        else:
            outcomes.append(Outcome(path, "ok"))
            assert entry.image is not None  # decode_item sets the image of every "ok" entry
            gt = entry.item.box.scale(entry.scale) if entry.item.box is not None else None
            good.append((outcomes[-1], entry, Image.fromarray(entry.image), gt))
    to_detect = [i for i, (_, _, _, gt) in enumerate(good) if needs_detector(config, gt)]
    detections: dict[int, list] = {}
    if to_detect:
        tic = time.perf_counter()
        found = models.detector.detect([good[i][2] for i in to_detect])
        timings["detect"] += time.perf_counter() - tic
        detections = dict(zip(to_detect, found, strict=True))
    crops: list[Image.Image] = []
    for i, (outcome, entry, image, gt) in enumerate(good):
        for crop_index, plan in enumerate(plan_image(config, image.width, image.height, detections.get(i), gt)):
            crops.append(apply_plan(image, plan))
            original = plan_in_original(plan, entry.scale)
            outcome.records.append(
                ItemRecord(
                    path=outcome.path,
                    label=entry.item.label,
                    content_hash=entry.content_hash or "",
                    box=original.region.as_list() if original.region is not None else None,
                    det_score=round(plan.detection.score, 4) if plan.detection else None,
                    det_class=plan.detection.class_name if plan.detection else None,
                    flags=list(original.flags),
                    image_size=list(entry.original_size) if entry.original_size else None,
                    crop_index=crop_index,
                )
            )
    return outcomes, crops


def attach_vectors(outcomes: list[Outcome], vectors: np.ndarray) -> list[Outcome]:
    """Give the ok outcomes their rows of ``vectors`` (one per record, in order)."""
    row = 0
    for outcome in outcomes:
        if outcome.status == "ok":
            outcome.vectors = np.asarray(vectors[row : row + len(outcome.records)], dtype=np.float32)
            row += len(outcome.records)
    if row != len(vectors):
        raise ValueError(f"{len(vectors)} vectors for {row} records")
    return outcomes
