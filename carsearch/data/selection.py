"""Pure functions: which detected box to crop, and the crop region with its margin."""

from __future__ import annotations

from collections.abc import Sequence

from carsearch.config import SelectionPolicy
from carsearch.types import FLAG_LOW_CONFIDENCE, FLAG_NO_DETECTION, BBox, CropPlan, Detection


def filter_small(detections: Sequence[Detection], min_box_size: float) -> list[Detection]:
    """Drop boxes whose shorter side is below ``min_box_size`` pixels."""
    return [d for d in detections if min(d.box.width, d.box.height) >= min_box_size]


def select_detections(detections: Sequence[Detection], policy: SelectionPolicy) -> list[Detection]:
    """Pick the box(es) to crop: ``largest`` area, ``most_confident``, or ``all`` (largest first)."""
    if not detections:
        return []
    if policy == "largest":
        return [max(detections, key=lambda d: (d.box.area, d.score))]
    if policy == "most_confident":
        return [max(detections, key=lambda d: (d.score, d.box.area))]
    if policy == "all":
        return sorted(detections, key=lambda d: (d.box.area, d.score), reverse=True)
    raise ValueError(f"unknown selection policy {policy!r}; valid: largest, most_confident, all")


def crop_region(box: BBox, width: int, height: int, margin: float) -> BBox:
    """``box`` grown by ``margin`` on each side, clipped to the image, snapped to whole pixels."""
    x1, y1, x2, y2 = box.expand(margin).clip(width, height).to_int()
    x2, y2 = min(x2, width), min(y2, height)
    if x2 <= x1:
        x1, x2 = max(0, min(x1, width - 1)), max(1, min(x1 + 1, width))
    if y2 <= y1:
        y1, y2 = max(0, min(y1, height - 1)), max(1, min(y1 + 1, height))
    return BBox(x1, y1, x2, y2)


def plan_crops(
    detections: Sequence[Detection],
    width: int,
    height: int,
    *,
    policy: SelectionPolicy,
    margin: float,
    min_box_size: float,
    confidence: float = 0.0,
    fallback_confidence: float | None = None,
) -> list[CropPlan]:
    """Crop plans for one image from the usable boxes (``min_box_size``) scoring at least ``confidence``.

    None there: the most confident usable box scoring at least ``fallback_confidence``, flagged
    ``low_confidence``; none either (or no fallback) → one whole-image plan flagged ``no_detection``.
    """
    usable = filter_small(detections, min_box_size)
    chosen = select_detections([d for d in usable if d.score >= confidence], policy)
    flags: tuple[str, ...] = ()
    if not chosen and fallback_confidence is not None:
        chosen = select_detections([d for d in usable if d.score >= fallback_confidence], "most_confident")
        flags = (FLAG_LOW_CONFIDENCE,)
    if not chosen:
        return [CropPlan(region=None, detection=None, flags=(FLAG_NO_DETECTION,))]
    return [CropPlan(region=crop_region(d.box, width, height, margin), detection=d, flags=flags) for d in chosen]
