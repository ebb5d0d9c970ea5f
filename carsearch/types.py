"""Small frozen value types shared by the stages (detector → embedder → index)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

CamMethod = Literal["gradcam", "gradcam++", "eigencam"]  # class activation map methods (explain/cam.py)
Engine = Literal["local", "ray"]  # batch-job engines (pipeline.ENGINES)


@dataclass(frozen=True)
class BBox:
    """An axis-aligned box in pixel coordinates, ``x2``/``y2`` exclusive."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"BBox coordinates must be finite, got {values}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(f"BBox needs x1 <= x2 and y1 <= y2, got {values}")

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def clip(self, width: int, height: int) -> BBox:
        """The box clipped to an image of ``width`` × ``height`` pixels."""
        return BBox(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
        )

    def expand(self, margin: float) -> BBox:
        """The box grown by ``margin`` × its width/height on each side (not clipped)."""
        dx, dy = self.width * margin, self.height * margin
        return BBox(self.x1 - dx, self.y1 - dy, self.x2 + dx, self.y2 + dy)

    def scale(self, factor: float) -> BBox:
        """The box with every coordinate multiplied by ``factor`` (image resize)."""
        return BBox(self.x1 * factor, self.y1 * factor, self.x2 * factor, self.y2 * factor)

    def iou(self, other: BBox) -> float:
        """Intersection over union with ``other`` (0 when both are empty)."""
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def to_int(self) -> tuple[int, int, int, int]:
        """Integer pixel box that contains this one (floor of the start, ceil of the end)."""
        return (math.floor(self.x1), math.floor(self.y1), math.ceil(self.x2), math.ceil(self.y2))

    def as_list(self) -> list[float]:
        return [round(self.x1, 2), round(self.y1, 2), round(self.x2, 2), round(self.y2, 2)]


@dataclass(frozen=True)
class Detection:
    """One detected vehicle: box in the coordinates of the image it was found in."""

    box: BBox
    score: float
    class_name: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Detection score must be in [0, 1], got {self.score}")

    def to_row(self) -> list[Any]:
        """``[x1, y1, x2, y2, score, class_name]``, JSON-able: the box rounded to 0.01 px, the score to 4 places.

        The one row format of stored detections (the training box cache, the compare's detections stage).
        Rounding is idempotent, so a detection read back with :meth:`from_row` encodes to the same row.
        """
        return [*self.box.as_list(), round(self.score, 4), self.class_name]

    @classmethod
    def from_row(cls, row: list[Any]) -> Detection:
        """The detection of a :meth:`to_row` row (as read back from JSON)."""
        return cls(BBox(*map(float, row[:4])), float(row[4]), str(row[5]))


# Flags recorded on indexed items.
FLAG_NO_DETECTION = "no_detection"
FLAG_GT_BOX = "gt_box"
FLAG_RAW = "raw"
FLAG_DOWNSCALED = "downscaled"
FLAG_LOW_CONFIDENCE = "low_confidence"  # cropped by detector.fallback_confidence


@dataclass(frozen=True)
class CropPlan:
    """What part of an image gets embedded: the region (None = whole image) and why."""

    region: BBox | None
    detection: Detection | None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchHit:
    """One retrieved gallery item."""

    rank: int
    item_id: int
    score: float
    label: str | None
    path: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SearchResult:
    """The answer to one query: how the query was cropped, the ranked hits, and the crop that was embedded.

    Hits are sorted by decreasing score unless ``reranked``: k-reciprocal re-ranking re-orders hits while
    their scores stay cosine similarities.
    """

    query_plan: CropPlan
    hits: tuple[SearchHit, ...]
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)
    query_crop: Any = field(default=None, compare=False, repr=False)  # PIL image (prepared like the gallery's)
    reranked: bool = False

    def __post_init__(self) -> None:
        ranks = [h.rank for h in self.hits]
        if ranks != list(range(1, len(ranks) + 1)):
            raise ValueError(f"hits must be ranked 1..n in order, got ranks {ranks}")
        scores = [h.score for h in self.hits]
        if not self.reranked and any(a < b - 1e-6 for a, b in zip(scores, scores[1:], strict=False)):
            raise ValueError("hits must be sorted by decreasing score (unless reranked)")
        ids = [h.item_id for h in self.hits]
        if len(set(ids)) != len(ids):
            raise ValueError("hit ids must be unique")
