"""Integration on real photos in ../shared (read in place, never copied); skipped when it is absent."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from carsearch.config import DetectorConfig
from carsearch.data.images import load_image
from carsearch.detector import VehicleDetector
from carsearch.pipeline import Pipeline

pytestmark = pytest.mark.shared


def test_detector_finds_cars_in_street_photos_and_none_without(shared_dir: Path, shared_detector: Path) -> None:
    detector = VehicleDetector(DetectorConfig(weights=str(shared_detector)))
    street = shared_dir / "data" / "street"
    rows = list(csv.DictReader((street / "street.csv").open()))
    with_car = [r["path"] for r in rows if r["vehicles"] == "yes"]
    without = [r["path"] for r in rows if r["vehicles"] == "no"]
    assert len(without) == 2 and len(with_car) >= 15
    found = detector.detect([load_image(street / p) for p in with_car + without])
    for name, detections in zip(with_car, found[: len(with_car)], strict=True):
        assert detections, f"no vehicle found in {name}"
        assert {d.class_name for d in detections} <= {"car", "truck", "bus"}
    for name, detections in zip(without, found[len(with_car) :], strict=True):
        assert detections == [], f"vehicle 'found' in {name}: {detections}"


def _subset_csv(shared_dir: Path, out: Path, classes: int, per_class: int) -> Path:
    """A CSV listing (absolute paths of) ``per_class`` crops of the first ``classes`` class ids."""
    root = shared_dir / "data" / "stanford_cars"
    chosen: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in csv.DictReader((root / "crops.csv").open()):
        cid = int(row["class_id"])
        if cid <= classes and len(chosen[cid]) < per_class:
            chosen[cid].append(row)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for rows in chosen.values():
            for row in rows:
                writer.writerow([str(root / row["path"]), row["label"]])
    return out


def test_index_200_shared_crops_and_search_same_class(shared_dir: Path, shared_detector: Path, tmp_path: Path) -> None:
    source = _subset_csv(shared_dir, tmp_path / "subset.csv", classes=10, per_class=20)
    pipe = Pipeline.from_config(
        overrides=[f"detector.weights={shared_detector}", "runtime.workers=1", "index.use_gpu=false"]
    )
    report = pipe.index(source, tmp_path / "idx")
    assert report.items_in_index == report.processed == 200 and report.errors == 0
    assert report.no_detection <= 20  # tight crops: the detector still finds the car in nearly all

    evaluation = pipe.evaluate(tmp_path / "idx")
    chance = 1 / 10
    assert evaluation.metrics.recall_at[1] > 3 * chance, evaluation.metrics
    assert evaluation.metrics.map_at_r > chance

    rows = list(csv.DictReader(source.open()))
    same = Counter()
    for row in rows[::20]:  # one query per class
        result = pipe.search(tmp_path / "idx", row["path"], k=5, exclude_self=True)
        same[row["label"]] = sum(hit.label == row["label"] for hit in result.hits)
    assert sum(same.values()) / (5 * len(same)) > 2 * chance, same


def test_audit_reports_every_known_duplicate_pair(shared_dir: Path, tmp_path: Path) -> None:
    root = shared_dir / "data" / "stanford_cars"
    pairs = list(csv.DictReader((root / "duplicates.csv").open()))
    labels = {row["path"]: row["label"] for row in csv.DictReader((root / "crops.csv").open())}
    paths = sorted({p for row in pairs for p in (row["path_a"], row["path_b"])})
    extra = [p for p in list(labels)[:40] if p not in paths]
    source = tmp_path / "dups.csv"
    source.write_text("path,label\n" + "".join(f"{root / p},{labels[p]}\n" for p in paths + extra))
    pipe = Pipeline.from_config(
        overrides=["crop=false", "embedder.model=imagenet", "embedder.image_size=64", "runtime.workers=0"]
    )
    pipe.index(source, tmp_path / "idx")
    from carsearch.index import GalleryIndex
    from carsearch.pipeline.audit import audit_index

    report = audit_index(GalleryIndex.load(tmp_path / "idx"))
    found = {frozenset((Path(d.path_a).name, Path(d.path_b).name)) for d in report.duplicates if d.kind == "exact"}
    expected = {frozenset((Path(r["path_a"]).name, Path(r["path_b"]).name)) for r in pairs}
    assert len(expected) == 9 and expected <= found
