"""Per-item metadata stored beside the vectors (one JSON line per indexed item)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ItemRecord:
    """One indexed crop. ``key`` identifies its source image; ``content_hash`` its bytes."""

    path: str
    label: str | None
    content_hash: str
    box: list[float] | None = None  # the embedded region (x1, y1, x2, y2) in original-image pixels
    det_score: float | None = None
    det_class: str | None = None
    flags: list[str] = field(default_factory=list)
    image_size: list[int] | None = None  # (width, height) of the original image
    crop_index: int = 0  # > 0 for the extra cars of an image under the "all" selection policy

    @property
    def key(self) -> str:
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
