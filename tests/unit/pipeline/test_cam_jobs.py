"""Explanations through the pipeline: a query's hits explained and saved, attention-in-box over a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.data.sources import read_source
from carsearch.embedder import Embedder
from carsearch.pipeline import Pipeline
from carsearch.pipeline.cam_jobs import attention_dataset, explain_query, load_item_crop, save_explanation
from carsearch.types import BBox
from tests.conftest import TEST_OVERRIDES, build_gallery, make_car_image
from tests.unit.explain.conftest import QuadrantModel


@pytest.fixture(scope="module")
def quadrant_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path, Path]:
    """A raw index of 2 classes × 3 images embedded by the quadrant model (looks at the top-left only)."""
    root = build_gallery(tmp_path_factory.mktemp("explain") / "gallery", classes=2, per_class=3)
    config = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).config
    pipeline = Pipeline(config, embedder=Embedder(QuadrantModel(), channels_last=False))
    out = root.parent / "idx"
    pipeline.index(root, out)
    return pipeline, root, out


def test_explain_query_points_at_the_region_the_model_uses(quadrant_index: tuple[Pipeline, Path, Path]) -> None:
    pipeline, root, out = quadrant_index
    query = root / "class_1" / "img_0.jpg"
    top_left = explain_query(pipeline, out, query, k=2, target_layer="backbone", box=BBox(0, 0, 80, 60))
    assert [v.rank for v in top_left.views] == [1, 2] and top_left.views[0].result_label == "class_1"
    assert top_left.photo_map.shape == (120, 160)
    assert top_left.attention is not None and top_left.attention > 0.8
    bottom_right = explain_query(pipeline, out, query, k=1, target_layer="backbone", box=BBox(80, 60, 160, 120))
    assert bottom_right.attention is not None and bottom_right.attention < 0.05


def test_save_explanation_writes_the_pictures(quadrant_index: tuple[Pipeline, Path, Path], tmp_path: Path) -> None:
    pipeline, root, out = quadrant_index
    explanation = explain_query(pipeline, out, root / "class_0" / "img_1.jpg", k=3, target_layer="backbone")
    summary = save_explanation(explanation, tmp_path / "full")
    assert [Path(f).name for f in summary["files"]] == [
        "query.png",
        "pair_01.png",
        "pair_02.png",
        "pair_03.png",
        "topk.png",
    ]
    assert json.loads((tmp_path / "full" / "explain.json").read_text())["hits"][0]["rank"] == 1
    assert summary["attention_in_box"] is None  # raw index, no box given: nothing to measure against
    with Image.open(tmp_path / "full" / "query.png") as query_png:
        assert query_png.size == (384, 288)  # 160 x 120 upscaled for readable boxes
    save_explanation(explanation, tmp_path / "redacted", redact=True)
    with (
        Image.open(tmp_path / "full" / "pair_01.png") as full,
        Image.open(tmp_path / "redacted" / "pair_01.png") as red,
    ):
        assert red.width < full.width / 1.8  # two CAM panels instead of four
        pixels = set(map(tuple, np.asarray(red.convert("RGB")).reshape(-1, 3).tolist()))
    with Image.open(root / "class_0" / "img_1.jpg") as photo:
        original = set(map(tuple, np.asarray(photo.convert("RGB")).reshape(-1, 3).tolist()))
    assert len(original & set(pixels)) < 0.05 * len(original)  # the photo's pixels are not in the picture


def test_load_item_crop_reads_the_embedded_region(tmp_path: Path) -> None:
    path = tmp_path / "car.png"
    make_car_image(3, (200, 0, 0)).save(path)
    crop = load_item_crop({"path": str(path), "box": [10, 20, 50, 60], "image_size": [160, 120]})
    assert crop.size == (40, 40)
    assert load_item_crop({"path": str(path), "box": None}).size == (160, 120)


def _csv(tmp_path: Path) -> Path:
    rows = ["path,label,x1,y1,x2,y2"]
    for i in range(3):
        make_car_image(i, (200, 30, 30)).save(tmp_path / f"car{i}.jpg")
        rows.append(f"car{i}.jpg,red,10,20,150,110")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    rows.append("broken.jpg,red,0,0,10,10")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data.csv"


def test_attention_dataset_raw_and_crop(tmp_path: Path) -> None:
    items = read_source(_csv(tmp_path))
    pipeline = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop_source=gt"])
    raw = attention_dataset(pipeline, items, crop=False, batch_size=2)
    crop = attention_dataset(pipeline, items, crop=True, method="eigencam", batch_size=2)
    for report in (raw, crop):
        assert report.summary.count == 3 and len(report.skipped) == 1
        assert "broken.jpg" in report.skipped[0]["path"]
        assert all(0.0 <= item["attention"] <= 1.0 and item["box_source"] == "gt" for item in report.items)
        data = report.to_dict()
        assert data["chance"] == pytest.approx(140 * 90 / (160 * 120), abs=1e-3)
    assert all(item["region"] is None for item in raw.items)
    assert all(item["region"] is not None for item in crop.items)
    assert crop.summary.mean > 0.6  # a crop of the box (+ margin) can only look at the box and the margin


def test_attention_skips_images_with_no_known_box(tmp_path: Path, tiny_yolo_blind: Path) -> None:
    for i in range(2):
        make_car_image(i, (0, 0, 200)).save(tmp_path / f"car{i}.jpg")
    pipeline = Pipeline.from_config(overrides=[*TEST_OVERRIDES, f"detector.weights={tiny_yolo_blind}"])
    report = attention_dataset(pipeline, read_source(tmp_path), crop=False)
    assert report.summary.count == 0 and len(report.skipped) == 2
    assert all("no car box" in s["reason"] for s in report.skipped)
