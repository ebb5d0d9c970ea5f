"""Indexes and configs that do not depend on the working directory: older indexes upgraded, shipped configs
resolved against their own folder, named detector weights kept in the cache folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from carsearch.cli import main
from carsearch.config import DetectorConfig, load_config
from carsearch.errors import IndexMismatchError
from carsearch.index import GalleryIndex
from carsearch.index.gallery import ITEMS, MANIFEST, write_hashed
from carsearch.pipeline import Pipeline
from tests.conftest import SHARED_DETECTOR, TEST_OVERRIDES, build_gallery


def _as_older_index(index_dir: Path, base: Path) -> None:
    """Rewrite an index as carsearch wrote it before: paths as typed (relative to ``base``), no path marker."""
    index = GalleryIndex.load(index_dir)
    table = index.records.with_paths_relative_to(str(base))
    assert len(table.relative_paths()) == len(table)
    manifest = json.loads((index_dir / MANIFEST).read_text())
    manifest["files"][ITEMS] = write_hashed(index_dir / ITEMS, table.write)
    del manifest["paths"]
    (index_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def older_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(build folder, index) of an index built from ``build`` by an older carsearch (relative paths)."""
    build = tmp_path / "build"
    build_gallery(build / "gallery")
    monkeypatch.chdir(build)
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).index("gallery", "idx")
    _as_older_index(build / "idx", build)
    return build, build / "idx"


def test_an_older_index_opened_where_it_was_built_finds_its_images_and_a_rerun_stores_them_absolute(
    older_index: tuple[Path, Path],
) -> None:
    build, index_dir = older_index
    opened = GalleryIndex.load(index_dir)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in opened.records.column("path"))
    report = Pipeline.for_update(index_dir).index("gallery", index_dir)
    assert (report.added, report.skipped, report.errors) == (0, len(opened), 0)  # matched: nothing re-embedded
    manifest = json.loads((index_dir / MANIFEST).read_text())
    assert manifest["paths"] == {"relative_to": "index", "relative": 0}


def test_an_older_index_opened_elsewhere_warns_and_refuses_to_grow_in_one_line(
    older_index: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    build, index_dir = older_index
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.WARNING):
        opened = GalleryIndex.load(index_dir)
    assert "relative to the folder the index was built in" in caplog.text
    assert opened.records[0].path.startswith("gallery/")
    assert main(["index", str(build / "gallery"), "--out", str(index_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "older carsearch" in err and "from that folder" in err


def test_files_inside_the_index_folder_are_stored_relative_to_it_and_move_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index_dir = tmp_path / "idx"
    build_gallery(index_dir / "photos")
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).index(index_dir / "photos", index_dir)
    assert json.loads((index_dir / MANIFEST).read_text())["paths"]["relative"] == 12
    moved = tmp_path / "moved"
    shutil.move(index_dir, moved)
    monkeypatch.chdir(tmp_path)
    paths = GalleryIndex.load(moved).records.column("path")
    assert all(p.startswith(f"{moved}/photos/") and Path(p).is_file() for p in paths)


def test_a_plain_python_update_refuses_a_setting_that_changes_the_vectors(older_index: tuple[Path, Path]) -> None:
    _, index_dir = older_index
    with pytest.raises(IndexMismatchError, match="--set embedder.image_size: .* was built with embedder.image_size=64"):
        Pipeline.for_update(index_dir, overrides=["embedder.image_size=96"])
    assert Pipeline.for_update(index_dir, overrides=["runtime.workers=1"]).config.runtime.workers == 1


@pytest.mark.skipif(not SHARED_DETECTOR.exists(), reason="needs ../shared")
def test_the_offline_config_means_the_same_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(load_config("offline").detector.weights) == SHARED_DETECTOR.resolve()


@pytest.mark.skipif(not SHARED_DETECTOR.exists(), reason="needs ../shared")
def test_named_detector_weights_live_in_the_cache_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carsearch.detector import VehicleDetector
    from carsearch.detector.weights import cache_dir, local_target

    monkeypatch.setenv("CARSEARCH_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert local_target("yolo11n.pt") == str(tmp_path / "cache" / "detector" / "yolo11n.pt")  # downloads there
    cache_dir().mkdir(parents=True)
    shutil.copy(SHARED_DETECTOR, cache_dir() / SHARED_DETECTOR.name)
    detector = VehicleDetector(DetectorConfig(weights=SHARED_DETECTOR.name))
    assert detector.weights_file == cache_dir() / SHARED_DETECTOR.name
    assert list(work.iterdir()) == []
