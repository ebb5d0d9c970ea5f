"""Two small indexes of the same generated gallery for the demo tests: cropped (tiny YOLO) and raw."""

from __future__ import annotations

from pathlib import Path

from carsearch.pipeline import Pipeline
from tests.conftest import TEST_OVERRIDES, build_gallery


def build_demo_indexes(root: Path, detector: Path) -> tuple[Path, Path, Path]:
    """(gallery folder, cropped index, raw index): 3 colour classes × 4 images."""
    gallery = build_gallery(root / "gallery")
    cropped, raw = root / "idx_crop", root / "idx_raw"
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, f"detector.weights={detector}"]).index(gallery, cropped)
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).index(gallery, raw)
    return gallery, cropped, raw
