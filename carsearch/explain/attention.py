"""Attention-in-box: the share of CAM energy that falls on the car (the energy-based pointing game)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from carsearch.explain.geometry import paste_into
from carsearch.types import BBox

HISTOGRAM_BINS = 10


def energy_in_box(cam: np.ndarray, box: BBox) -> float:
    """Σ CAM inside ``box`` / Σ CAM over the (H, W) map, in [0, 1]; NaN when the map is all zero.

    Pixel ``(x, y)`` is inside when its centre is: ``x1 <= x + 0.5 < x2`` (same for y).
    """
    if cam.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {cam.shape}")
    cam = np.clip(cam.astype(np.float64), 0.0, None)
    total = cam.sum()
    if total <= 0:
        return math.nan
    height, width = cam.shape
    x1, x2 = (int(np.clip(math.ceil(v - 0.5), 0, width)) for v in (box.x1, box.x2))
    y1, y2 = (int(np.clip(math.ceil(v - 0.5), 0, height)) for v in (box.y1, box.y2))
    return float(cam[y1:y2, x1:x2].sum() / total)


@overload
def photo_attention(
    cam: np.ndarray, region: BBox | None, size: tuple[int, int], box: BBox
) -> tuple[np.ndarray, float]: ...
@overload
def photo_attention(
    cam: np.ndarray, region: BBox | None, size: tuple[int, int], box: BBox | None
) -> tuple[np.ndarray, float | None]: ...
def photo_attention(
    cam: np.ndarray, region: BBox | None, size: tuple[int, int], box: BBox | None
) -> tuple[np.ndarray, float | None]:
    """A crop's CAM over the whole photo and the share of its energy in the car's ``box`` (None without one).

    ``cam``: the map of the crop taken at ``region`` (None: of the whole photo); ``size``: the photo's
    (width, height). The map is :func:`~carsearch.explain.geometry.paste_into` the photo, then scored by
    :func:`energy_in_box`: attention-in-box in photo pixels, whatever was cropped.
    """
    photo_map = paste_into(cam, region, *size)
    return photo_map, (energy_in_box(photo_map, box) if box is not None else None)


@dataclass(frozen=True)
class AttentionSummary:
    """Attention-in-box over a dataset: mean, median, the share of images looking mostly outside the box."""

    count: int
    mean: float
    median: float
    share_mostly_outside: float  # images with less than half of the energy inside the box
    histogram: list[int]  # counts over HISTOGRAM_BINS equal bins of [0, 1]
    undefined: int = 0  # all-zero maps (no energy to share)

    @classmethod
    def from_scores(cls, scores: list[float]) -> AttentionSummary:
        values = np.array([s for s in scores if not math.isnan(s)], dtype=np.float64)
        undefined = len(scores) - len(values)
        if not len(values):
            return cls(0, math.nan, math.nan, math.nan, [0] * HISTOGRAM_BINS, undefined)
        histogram, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
        return cls(
            count=len(values),
            mean=float(values.mean()),
            median=float(np.median(values)),
            share_mostly_outside=float((values < 0.5).mean()),
            histogram=[int(v) for v in histogram],
            undefined=undefined,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean,
            "median": self.median,
            "share_mostly_outside": self.share_mostly_outside,
            "histogram": self.histogram,
            "histogram_bins": [round(i / HISTOGRAM_BINS, 2) for i in range(HISTOGRAM_BINS + 1)],
            "undefined": self.undefined,
        }
