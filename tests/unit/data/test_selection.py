from __future__ import annotations

import pytest

from carsearch.config import DetectorConfig
from carsearch.data.selection import crop_region, filter_small, plan_crops, select_detections
from carsearch.types import FLAG_LOW_CONFIDENCE, FLAG_NO_DETECTION, BBox, Detection


def det(x1: float, y1: float, x2: float, y2: float, score: float) -> Detection:
    return Detection(BBox(x1, y1, x2, y2), score, "car")


SMALL_SURE = det(0, 0, 20, 20, 0.95)
BIG_UNSURE = det(10, 10, 110, 60, 0.40)
MEDIUM = det(50, 50, 100, 90, 0.70)


def test_largest_policy_picks_biggest_area() -> None:
    assert select_detections([SMALL_SURE, BIG_UNSURE, MEDIUM], "largest") == [BIG_UNSURE]


def test_most_confident_policy_picks_highest_score() -> None:
    assert select_detections([SMALL_SURE, BIG_UNSURE, MEDIUM], "most_confident") == [SMALL_SURE]


def test_all_policy_keeps_every_box_largest_first() -> None:
    assert select_detections([SMALL_SURE, BIG_UNSURE, MEDIUM], "all") == [BIG_UNSURE, MEDIUM, SMALL_SURE]


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="largest"):
        select_detections([SMALL_SURE], "biggest")  # type: ignore[arg-type]


def test_filter_small_uses_the_shorter_side() -> None:
    thin = det(0, 0, 200, 10, 0.9)
    assert filter_small([thin, MEDIUM], min_box_size=16) == [MEDIUM]


def test_crop_region_adds_margin_and_clips_to_image() -> None:
    region = crop_region(BBox(10, 20, 110, 70), width=200, height=100, margin=0.1)
    assert region == BBox(0, 15, 120, 75)  # 10 px x-margin clipped at 0, 5 px y-margin
    corner = crop_region(BBox(150, 80, 200, 100), width=200, height=100, margin=0.5)
    assert (corner.x2, corner.y2) == (200, 100)
    assert corner.x1 == 125 and corner.y1 == 70


def test_crop_region_never_empty() -> None:
    region = crop_region(BBox(199.6, 99.7, 199.8, 99.9), width=200, height=100, margin=0.0)
    assert region.width >= 1 and region.height >= 1
    assert region.x2 <= 200 and region.y2 <= 100


def test_no_detection_gives_one_whole_image_plan_flagged() -> None:
    plans = plan_crops([], 100, 80, policy="largest", margin=0.08, min_box_size=16)
    assert len(plans) == 1
    assert plans[0].region is None and FLAG_NO_DETECTION in plans[0].flags


def test_only_tiny_boxes_count_as_no_detection() -> None:
    plans = plan_crops([det(0, 0, 5, 5, 0.99)], 100, 80, policy="largest", margin=0.0, min_box_size=16)
    assert FLAG_NO_DETECTION in plans[0].flags


def test_all_policy_gives_one_plan_per_car() -> None:
    plans = plan_crops([BIG_UNSURE, MEDIUM], 200, 100, policy="all", margin=0.0, min_box_size=16)
    assert [p.detection for p in plans] == [BIG_UNSURE, MEDIUM]
    assert plans[0].region == BBox(10, 10, 110, 60)


def test_box_iou() -> None:
    a, b = BBox(0, 0, 10, 10), BBox(5, 0, 15, 10)
    assert a.iou(a) == 1.0 and a.iou(b) == b.iou(a) == 50 / 150
    assert a.iou(BBox(20, 20, 30, 30)) == 0.0 and BBox(3, 3, 3, 3).iou(BBox(3, 3, 3, 3)) == 0.0


def test_no_box_at_the_confidence_falls_back_to_the_most_confident_one_above_the_floor() -> None:
    low_big, low_sure, tiny = det(0, 0, 150, 90, 0.08), det(20, 10, 120, 70, 0.2), det(0, 0, 5, 5, 0.9)
    boxes = [low_big, low_sure, tiny]
    kwargs: dict = {"policy": "largest", "margin": 0.0, "min_box_size": 16, "confidence": 0.25}
    (whole,) = plan_crops(boxes, 200, 100, **kwargs)
    assert whole.region is None and whole.flags == (FLAG_NO_DETECTION,)
    (fallback,) = plan_crops(boxes, 200, 100, fallback_confidence=0.05, **kwargs)
    assert fallback.detection == low_sure and fallback.flags == (FLAG_LOW_CONFIDENCE,)  # not the tiny 0.9 one
    (none_left,) = plan_crops(boxes, 200, 100, fallback_confidence=0.5, **kwargs)
    assert none_left.region is None and none_left.flags == (FLAG_NO_DETECTION,)
    (passing,) = plan_crops([*boxes, det(10, 10, 60, 60, 0.3)], 200, 100, fallback_confidence=0.05, **kwargs)
    assert passing.detection.score == 0.3 and passing.flags == ()  # a box at the confidence: no fallback


def test_the_detector_runs_at_the_lower_of_confidence_and_fallback() -> None:
    assert DetectorConfig(confidence=0.35, fallback_confidence=None).detection_floor == 0.35
    assert DetectorConfig(confidence=0.35, fallback_confidence=0.05).detection_floor == 0.05
    assert DetectorConfig(confidence=0.05, fallback_confidence=0.1).detection_floor == 0.05
