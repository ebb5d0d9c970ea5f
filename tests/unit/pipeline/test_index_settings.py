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
    import os

    import pyarrow as pa

    from carsearch.index.records import SCHEMA, RecordTable

    records = GalleryIndex.load(index_dir).records.table
    paths = [os.path.relpath(p, base) for p in records.column("path").to_pylist()]
    table = RecordTable(records.set_column(0, SCHEMA.field("path"), pa.array(paths, pa.string())))
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
    from carsearch.detector.weights import bundle, describe

    record = describe(detector.weights_file, SHARED_DETECTOR.name)  # recorded where it really is: the cache
    assert record.source == str(cache_dir() / SHARED_DETECTOR.name)
    copied = bundle(record, detector.weights_file, tmp_path / "idx")
    assert (tmp_path / "idx" / str(copied.file)).stat().st_mode & 0o044 == 0o044  # readable by other users


def test_an_older_index_with_dotdot_paths_is_upgraded_without_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths typed as ``../gallery/…`` match the job's absolute keys once normalised (nothing re-embedded)."""
    build = tmp_path / "build"
    build_gallery(build / "gallery")
    (build / "sub").mkdir()
    monkeypatch.chdir(build / "sub")
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).index("../gallery", "idx")
    _as_older_index(build / "sub" / "idx", build / "sub")  # ../gallery/class_0/img_0.jpg, …
    index = GalleryIndex.load(build / "sub" / "idx")
    assert all(".." not in p for p in index.records.column("path"))
    report = Pipeline.for_update("idx").index("../gallery", "idx")
    assert (report.added, report.items_in_index) == (0, 12)


def test_a_rerun_with_the_config_file_it_was_built_with_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A full config file (as `carsearch config` prints it) names every key: only real changes are refused."""
    import yaml

    from carsearch.config_files import to_dict

    monkeypatch.chdir(tmp_path)
    build_gallery(tmp_path / "gallery")
    full = tmp_path / "my.yaml"
    full.write_text(yaml.safe_dump(to_dict(load_config(None, [*TEST_OVERRIDES, "crop=false"]))))
    reports = []
    for _ in range(2):
        assert main(["index", "gallery", "--out", "idx", "--config", str(full), "--json", "--no-progress"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert (reports[1]["added"], reports[1]["skipped"], reports[1]["errors"]) == (0, 12, 0)


def test_a_moved_index_does_not_bring_the_build_machines_device(tmp_path: Path) -> None:
    build_gallery(tmp_path / "gallery")
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false", "runtime.device=cpu"]).index(
        tmp_path / "gallery", tmp_path / "idx"
    )
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    manifest["config"]["runtime"]["device"] = "cuda"  # built on a GPU machine
    (tmp_path / "idx" / MANIFEST).write_text(json.dumps(manifest))
    assert Pipeline.for_index(tmp_path / "idx").config.runtime.device == "auto"


def test_damaged_or_misplaced_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    build_gallery(tmp_path / "gallery")
    (tmp_path / "afile").write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("detector: [unclosed\n")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / MANIFEST).write_text("{not json")
    for argv in (
        ["index", str(tmp_path / "gallery"), "--out", str(tmp_path / "afile"), "--raw"],
        ["index", str(tmp_path / "gallery"), "--out", str(tmp_path / "new"), "--config", str(bad_yaml)],
        ["evaluate", str(tmp_path / "idx")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err


def test_an_index_inside_its_own_source_does_not_index_its_own_files(tmp_path: Path) -> None:
    build_gallery(tmp_path / "photos")
    pipe = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"])
    pipe.index(tmp_path / "photos", tmp_path / "photos" / "idx")
    again = pipe.index(tmp_path / "photos", tmp_path / "photos" / "idx")
    assert (again.errors, again.added, again.items_in_index) == (0, 0, 12)
