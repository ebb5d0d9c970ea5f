"""carsearch compare --quick on a generated background-shortcut dataset: cropping must win; stages cache."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from carsearch.cli import main
from carsearch.compare import load_compare_config
from carsearch.config_files import CONFIGS_DIR
from carsearch.errors import ConfigError

CONFIG = CONFIGS_DIR / "compare.yaml"
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]  # fmt: skip


def shortcut_dataset(root: Path, per_class: int = 5) -> Path:
    """12 classes; the class is the colour of a box-shaped "car" on a striped background. Training classes
    (0-5) each have their own background colour — a shortcut; test classes (6-11) get background colours
    at random, so there the shortcut misleads."""
    rng = np.random.default_rng(0)
    rows = ["path,label,x1,y1,x2,y2"]
    stripes = (np.arange(128) // 8) % 2 == 1
    for c in range(12):
        for i in range(per_class):
            background = np.array(PALETTE[(c + 6) % 12] if c < 6 else PALETTE[int(rng.integers(0, 12))])
            pixels = np.empty((96, 128, 3), dtype=np.int64)
            pixels[:] = background
            pixels[:, stripes] = background * 2 // 5
            pixels += rng.integers(-20, 20, size=pixels.shape)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            w, h = int(rng.integers(44, 56)), int(rng.integers(30, 40))
            x1, y1 = int(rng.integers(4, 128 - w - 4)), int(rng.integers(4, 96 - h - 4))
            ImageDraw.Draw(image).rectangle([x1, y1, x1 + w - 1, y1 + h - 1], fill=PALETTE[c])
            name = f"c{c:02d}_{i}.png"
            image.save(root / name)
            rows.append(f"{name},class_{c:02d},{x1},{y1},{x1 + w},{y1 + h}")
    (root / "photos.csv").write_text("\n".join(rows) + "\n")
    return root / "photos.csv"


def _args(source: Path, detector: Path, out: Path) -> list[str]:
    sets = [f"data.source={source}", "data.where={}", f"detector.weights={detector}", "detector.margin=0", "device=cpu"]
    return ["compare", "--config", str(CONFIG), "--quick", "--out", str(out), *sum((["--set", s] for s in sets), [])]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:  # noqa: ARG002
        self.tags.append(tag)


def test_quick_compare_crop_beats_raw_and_caches(tmp_path: Path, tiny_yolo: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    source = shortcut_dataset(data)
    out = tmp_path / "report"
    assert main(_args(source, tiny_yolo, out)) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["split"] == {
        "train_classes": 6, "test_classes": 6, "train_images": 30, "test_images": 30, "resolution": ["128x96"],
    }  # fmt: skip
    grid = results["retrieval"]
    assert set(grid) == {"zero_shot", "ft_raw", "ft_crop"} and set(grid["zero_shot"]) == {"raw", "detector", "gt"}
    # the test that can fail: the car, cut out, beats the misleading background
    assert grid["zero_shot"]["gt"]["recall_at_1"] > grid["zero_shot"]["raw"]["recall_at_1"] + 0.2
    assert grid["zero_shot"]["gt"]["map_at_r"] > grid["zero_shot"]["raw"]["map_at_r"]
    quality = results["detector_quality"]["thresholds"]
    assert set(quality) == {"0.1", "0.25", "0.5"} and sum(quality["0.25"]["iou_histogram"]) <= 60
    assert all(0 <= results["attention"][n]["mean"] <= 1 for n in grid)
    assert {s["status"] for s in results["stages"]} == {"computed"}

    md = (out / "report.md").read_text()
    assert "| embedder \\ inputs | raw photo | detector crop | ground-truth crop |" in md
    assert "## Conclusion" in md and "figures/retrieval.png" in md
    for name in ("retrieval.png", "detector_iou.png", "attention.png"):
        with Image.open(out / "figures" / name) as picture:
            assert picture.format == "PNG"
    parser = _Tags()
    parser.feed((out / "report.html").read_text())
    assert parser.tags.count("table") == 4 and "img" in parser.tags
    assert "data:image/png;base64," in (out / "report.html").read_text()

    assert main(_args(source, tiny_yolo, out)) == 0  # a re-run reuses every stage
    again = json.loads((out / "results.json").read_text())
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert again["retrieval"] == results["retrieval"]


def test_compare_config_file_and_validation() -> None:
    config = load_compare_config(CONFIG)
    assert config.data.where == {"box_fully_visible": "1"} and config.train.recipe == "cpu_quick"
    assert load_compare_config(CONFIG, quick=True).image_size == 64


@pytest.mark.parametrize("quick", [False, True])
def test_the_fine_tuned_rows_train_and_embed_at_the_compare_image_size(tmp_path: Path, quick: bool) -> None:
    """The recipe's own geometry (cpu_quick: 256-px views, 320-px inference) does not leak into the compare."""
    from carsearch.compare.experiment import PhotoSplit, train_config
    from carsearch.data.sources import SourceItem
    from carsearch.types import BBox

    config = load_compare_config(CONFIG, quick=quick)
    items = [SourceItem(tmp_path / f"{i}.jpg", f"class{i % 4}", BBox(0, 0, 8, 8)) for i in range(16)]
    data = train_config(config, PhotoSplit(items, []), "ft_crop", tmp_path).data
    size = config.image_size
    assert data.image_size == size and data.train_crop_size == (size, size)
    assert data.train_size == (round(size * 8 / 7), round(size * 8 / 7))
    with pytest.raises(ConfigError, match="train_share"):
        load_compare_config(CONFIG, ["data.train_share=1.5"])
    with pytest.raises(ConfigError):
        load_compare_config(CONFIG, ["nope=1"])
