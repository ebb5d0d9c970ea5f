"""One pair of small demo indexes (cropped with the tiny YOLO, raw) for the demo's search and API tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from carsearch.demo.backend import DemoBackend
from tests.demo_fixtures import build_demo_indexes


@pytest.fixture(scope="package")
def demo_indexes(tmp_path_factory: pytest.TempPathFactory, tiny_yolo: Path) -> tuple[Path, Path, Path]:
    """(gallery folder, cropped index, raw index)."""
    return build_demo_indexes(tmp_path_factory.mktemp("demo_indexes"), tiny_yolo)


@pytest.fixture(scope="package")
def cropped_backend(demo_indexes: tuple[Path, Path, Path]) -> DemoBackend:
    """The cropped index alone (as ``carsearch demo INDEX``)."""
    return DemoBackend.load(demo_indexes[1])
