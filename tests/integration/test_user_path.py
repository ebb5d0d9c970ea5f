"""The user's path, offline: build an index of a small labelled folder from one working directory with a
relative detector path, move the index, use it from another folder, then add photos with a plain re-run.

Real crops from ../shared (copied into a temporary folder for the test only); skipped when it is absent.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carsearch.cli import main
from tests.conftest import TEST_OVERRIDES

pytestmark = pytest.mark.shared

CLASSES, PER_CLASS = 3, 4  # the last photo of each class is added by the re-run


def _photo_folder(shared_dir: Path, root: Path) -> tuple[Path, list[Path]]:
    """``root/photos/<label>/`` with PER_CLASS - 1 crops of CLASSES classes, and the held-back ones."""
    crops = shared_dir / "data" / "stanford_cars"
    rows = list(csv.DictReader((crops / "crops.csv").open()))
    held: list[Path] = []
    for class_id in range(1, CLASSES + 1):
        picked = [r for r in rows if int(r["class_id"]) == class_id][:PER_CLASS]
        folder = root / "photos" / picked[0]["label"].replace(" ", "_")
        folder.mkdir(parents=True)
        for row in picked[:-1]:
            shutil.copy(crops / row["path"], folder)
        spare = root / "spare" / folder.name
        spare.mkdir(parents=True)
        held.append(Path(shutil.copy(crops / picked[-1]["path"], spare)))
    return root / "photos", held


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"carsearch {' '.join(argv)} exited {code}: {err}"
    return out


def test_an_index_built_here_works_moved_and_from_another_folder_and_a_plain_rerun_adds_photos(
    shared_dir: Path, shared_detector: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    build = tmp_path / "build"
    photos, held = _photo_folder(shared_dir, build)
    (build / "models").mkdir()
    shutil.copy(shared_detector, build / "models")
    monkeypatch.chdir(build)
    sets = [arg for override in TEST_OVERRIDES for arg in ("--set", override)]
    _run(capsys, "index", "photos", "--out", "idx", "--detector-weights", "models/yolov8n_coco_int8.tflite", *sets)

    # Move the index, and take the detector file away from where it was: the index keeps its own copy.
    moved = tmp_path / "elsewhere" / "my_index"
    moved.parent.mkdir()
    shutil.move(build / "idx", moved)
    shutil.rmtree(build / "models")
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    query = next(photos.glob("*/*.jpg"))

    found = json.loads(_run(capsys, "search", str(moved), str(query), "-k", "3", "--json"))
    assert found["hits"] and found["hits"][0]["path"] == str(query)  # the indexed photo finds itself first
    assert all(Path(hit["path"]).is_file() for hit in found["hits"])

    _run(capsys, "explain", str(moved), str(query), "--out", "explained", "--top", "2")
    explained = json.loads((user / "explained" / "explain.json").read_text())
    assert len(explained["hits"]) == 2
    assert (user / "explained" / "pair_01.png").is_file() and (user / "explained" / "query.png").is_file()

    metrics = json.loads(_run(capsys, "evaluate", str(moved), "--json"))
    assert metrics["labelled_items"] == CLASSES * (PER_CLASS - 1)

    from carsearch.demo.handlers import DemoBackend

    backend = DemoBackend.load(moved)
    assert len(backend.main.gallery) == CLASSES * (PER_CLASS - 1)
    assert backend.main.pipeline.search(backend.main.gallery, query, k=1).hits[0].path == str(query)

    # Two new photos, then a plain re-run from the build folder: the index's own settings are reused.
    for photo in held[:2]:
        shutil.copy(photo, photos / photo.parent.name)
    monkeypatch.chdir(build)
    report = json.loads(_run(capsys, "index", "photos", "--out", str(moved), "--json", "--no-progress"))
    assert (report["added"], report["errors"], report["skipped"]) == (2, 0, CLASSES * (PER_CLASS - 1))
    assert report["items_in_index"] == CLASSES * (PER_CLASS - 1) + 2


def test_a_conflicting_flag_on_a_rerun_is_refused_in_one_line(
    shared_dir: Path, shared_detector: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    photos, _ = _photo_folder(shared_dir, tmp_path)
    sets = [arg for override in TEST_OVERRIDES for arg in ("--set", override)]
    _run(
        capsys, "index", str(photos), "--out", str(tmp_path / "idx"), "--detector-weights", str(shared_detector), *sets
    )
    for flags, named in (
        (["--raw"], "--raw"),
        (["--set", "detector.confidence=0.5"], "--set detector.confidence"),
        (["--set", "embedder.image_size=96"], "--set embedder.image_size"),
    ):
        assert main(["index", str(photos), "--out", str(tmp_path / "idx"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err and "was built with" in err, err
    # The same detector under another path is the same detector: accepted (nothing new to add).
    copy = tmp_path / "copy.tflite"
    shutil.copy(shared_detector, copy)
    report = json.loads(
        _run(capsys, "index", str(photos), "--out", str(tmp_path / "idx"), "--detector-weights", str(copy), "--json")
    )
    assert report["skipped"] == CLASSES * (PER_CLASS - 1) and report["added"] == 0
    # A fresh process (ultralytics imported for the first time inside the detector) keeps stdout pure JSON.
    query = next(photos.glob("*/*.jpg"))
    printed = subprocess.run(
        [sys.executable, "-m", "carsearch.cli", "search", str(tmp_path / "idx"), str(query), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "YOLO_VERBOSE"},  # as a user runs it
    ).stdout
    assert json.loads(printed)["hits"][0]["path"] == str(query)


def test_an_index_whose_detector_file_is_gone_or_changed_refuses_to_grow(
    shared_dir: Path, shared_detector: Path, tmp_path: Path, capsys
) -> None:
    photos, _ = _photo_folder(shared_dir, tmp_path)
    weights = tmp_path / "det.tflite"
    shutil.copy(shared_detector, weights)
    sets = [arg for override in TEST_OVERRIDES for arg in ("--set", override)]
    _run(capsys, "index", str(photos), "--out", str(tmp_path / "idx"), "--detector-weights", str(weights), *sets)
    shutil.rmtree(tmp_path / "idx" / "detector")
    weights.write_bytes(weights.read_bytes()[:-1000])  # the recorded source now holds other bytes
    assert main(["index", str(photos), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "are neither in" in err and "--detector-weights" in err, err
    assert main(["index", str(photos), "--out", str(tmp_path / "idx"), "--detector-weights", str(weights)]) == 2
    assert "built with other detector weights" in capsys.readouterr().err
