"""Mapping CAMs back to images and photos; energy in a box; dataset summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carsearch.embedder.preprocessing import Preprocessing
from carsearch.explain import AttentionSummary, cam_to_image, energy_in_box, paste_into, photo_attention
from carsearch.types import BBox


def _left_half(size: int) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[:, : size // 2] = 1.0
    return cam


def test_squash_stretches_the_map_back() -> None:
    out = cam_to_image(_left_half(32), 100, 40, Preprocessing(image_size=32, resize="squash"))
    assert out.shape == (40, 100)
    assert energy_in_box(out, BBox(0, 0, 50, 40)) > 0.97


def test_center_crop_maps_to_the_centre_and_leaves_the_border_unseen() -> None:
    out = cam_to_image(np.ones((32, 32), np.float32), 100, 40, Preprocessing(image_size=32, resize="center_crop"))
    assert out.shape == (40, 100)
    assert out[:, :30].sum() == 0 and out[:, 70:].sum() == 0
    assert energy_in_box(out, BBox(30, 0, 70, 40)) == pytest.approx(1.0)


def test_paste_into_places_a_crop_map_at_its_region() -> None:
    crop_map = np.ones((20, 30), np.float32)
    out = paste_into(crop_map, BBox(10, 5, 40, 25), 100, 50)
    assert out.shape == (50, 100) and out.sum() == pytest.approx(600)
    assert out[5:25, 10:40].min() == 1.0
    assert paste_into(crop_map, None, 30, 20) is crop_map  # raw: the map already covers the photo


def test_photo_attention_pastes_the_crop_map_then_scores_the_box() -> None:
    crop_map = np.ones((20, 30), np.float32)
    photo_map, share = photo_attention(crop_map, BBox(10, 5, 40, 25), (100, 50), BBox(10, 5, 25, 25))
    np.testing.assert_array_equal(photo_map, paste_into(crop_map, BBox(10, 5, 40, 25), 100, 50))
    assert share == pytest.approx(0.5)  # half the crop lies in the box
    _, none = photo_attention(crop_map, None, (30, 20), None)
    assert none is None  # no box known: the map alone


def test_energy_in_box_counts_pixel_centres() -> None:
    cam = np.zeros((10, 10), np.float32)
    cam[2:4, 2:4] = 1.0
    assert energy_in_box(cam, BBox(2, 2, 4, 4)) == 1.0
    assert energy_in_box(cam, BBox(3, 2, 10, 10)) == pytest.approx(0.5)
    assert energy_in_box(cam, BBox(5, 5, 10, 10)) == 0.0
    assert math.isnan(energy_in_box(np.zeros((4, 4)), BBox(0, 0, 2, 2)))
    with pytest.raises(ValueError, match="expected an"):
        energy_in_box(np.zeros((2, 2, 3)), BBox(0, 0, 1, 1))


def test_summary_statistics() -> None:
    summary = AttentionSummary.from_scores([0.1, 0.4, 0.9, 1.0, math.nan])
    assert summary.count == 4 and summary.undefined == 1
    assert summary.mean == pytest.approx(0.6) and summary.median == pytest.approx(0.65)
    assert summary.share_mostly_outside == pytest.approx(0.5)
    assert sum(summary.histogram) == 4 and summary.histogram[-1] == 2
    assert summary.to_dict()["histogram_bins"][0] == 0.0
    empty = AttentionSummary.from_scores([])
    assert empty.count == 0 and math.isnan(empty.mean)
