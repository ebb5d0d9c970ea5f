"""Overlay pictures: sizes, panels, grids, the attention plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.explain import AttentionSummary
from carsearch.explain.render import PANEL_HEIGHT, PairView, attention_plot, draw_box, overlay, topk_grid
from carsearch.types import BBox
from tests.conftest import make_car_image


def test_overlay_keeps_the_image_size_and_colours_the_hot_region() -> None:
    image = Image.new("RGB", (80, 40), (128, 128, 128))
    cam = np.zeros((40, 80), np.float32)
    cam[:, 40:] = 1.0
    out = np.asarray(overlay(image, cam)).astype(int)
    assert out.shape == (40, 80, 3)
    assert out[20, 60, 0] > out[20, 10, 0]  # jet: hot is red, cold is blue
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((10, 10), np.float32))


def test_draw_box_outlines_without_touching_the_input() -> None:
    image = Image.new("RGB", (100, 60), "white")
    out = draw_box(image, BBox(10, 10, 50, 40), label="car 0.9")
    assert out.getpixel((10, 25)) == (0, 255, 0) and image.getpixel((10, 25)) == (255, 255, 255)


def test_topk_grid_has_one_row_per_result(tmp_path: Path) -> None:
    q, r = make_car_image(0, (200, 0, 0)), make_car_image(1, (0, 0, 200), size=(90, 120))
    cam_q, cam_r = np.random.rand(120, 160).astype(np.float32), np.random.rand(120, 90).astype(np.float32)
    views = [PairView(q, cam_q, r, cam_r, 0.9 - 0.1 * i, i + 1, "red", "blue") for i in range(3)]
    grid = topk_grid(views)
    assert grid.height >= 3 * PANEL_HEIGHT and grid.width > 4 * 160
    grid.save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == grid.size
    with pytest.raises(ValueError, match="no results"):
        topk_grid([])


def test_attention_plot_writes_a_png(tmp_path: Path) -> None:
    summaries = {"raw": AttentionSummary.from_scores([0.2, 0.5, 0.7]), "crop": AttentionSummary.from_scores([0.9])}
    path = attention_plot(summaries, tmp_path / "plots" / "attention.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 350)
