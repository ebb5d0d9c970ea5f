"""The detector wrapper on the real ultralytics path, with a tiny random-weight YOLO built from yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from carsearch.config import DetectorConfig
from carsearch.detector import VehicleDetector, resolve_vehicle_classes
from carsearch.detector.yolo import detector_input
from carsearch.errors import ModelLoadError
from tests.conftest import make_car_image


def test_vehicle_classes_resolved_by_name() -> None:
    names = {0: "person", 2: "Car", 5: "bus", 7: "truck", 9: "boat"}
    assert resolve_vehicle_classes(names, ("car", "truck", "bus")) == {2: "Car", 5: "bus", 7: "truck"}


def test_single_class_model_is_used_whatever_its_name() -> None:
    assert resolve_vehicle_classes({0: "vehicle"}, ("car",)) == {0: "vehicle"}


def test_model_without_vehicle_classes_is_refused_with_its_class_list() -> None:
    with pytest.raises(ModelLoadError, match="person"):
        resolve_vehicle_classes({0: "person", 1: "dog"}, ("car",))


def test_detections_are_valid_boxes_inside_the_image(tiny_yolo: Path) -> None:
    detector = VehicleDetector(DetectorConfig(weights=str(tiny_yolo), image_size=160, confidence=0.5, max_detections=5))
    assert detector.class_names == {2: "car", 5: "bus", 7: "truck"}
    images = [make_car_image(1, (200, 0, 0), size=(160, 120)), make_car_image(2, (0, 0, 200), size=(90, 200))]
    results = detector.detect(images)
    assert len(results) == 2
    for image, detections in zip(images, results, strict=True):
        assert 1 <= len(detections) <= 5
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            assert d.class_name == "car"
            assert 0.5 <= d.score <= 1.0
            assert 0 <= d.box.x1 < d.box.x2 <= image.width
            assert 0 <= d.box.y1 < d.box.y2 <= image.height


def test_confidence_threshold_filters(tiny_yolo: Path) -> None:
    # The tiny model's car score is sigmoid(3) ≈ 0.95: a 0.99 threshold must drop everything.
    strict = DetectorConfig(weights=str(tiny_yolo), image_size=160, confidence=0.99, fallback_confidence=None)
    assert VehicleDetector(strict).detect([make_car_image(1, (200, 0, 0))]) == [[]]
    # With a fallback the detector runs at its floor: the boxes below the confidence come back for the fallback
    floor = dataclasses.replace(strict, fallback_confidence=0.5)
    assert all(0.5 <= d.score < 0.99 for d in VehicleDetector(floor).detect([make_car_image(1, (200, 0, 0))])[0])
    assert VehicleDetector(floor).detect([make_car_image(1, (200, 0, 0))])[0]


def test_blind_model_finds_nothing(tiny_yolo_blind: Path) -> None:
    detector = VehicleDetector(DetectorConfig(weights=str(tiny_yolo_blind), image_size=160, confidence=0.25))
    assert detector.detect([make_car_image(1, (200, 0, 0))]) == [[]]


def test_empty_batch() -> None:
    detector = VehicleDetector.__new__(VehicleDetector)
    assert detector.detect([]) == []


def test_missing_weights_give_one_line_hint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="--detector-weights"):
        VehicleDetector(DetectorConfig(weights=str(tmp_path / "nope.pt")))


def test_corrupt_weights_give_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="bad.pt"):
        VehicleDetector(DetectorConfig(weights=str(bad)))


def test_detection_keeps_the_callers_torch_thread_count(tiny_yolo: Path) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        detector = VehicleDetector(DetectorConfig(weights=str(tiny_yolo), image_size=160), device="cpu")
        detector.detect([make_car_image(1, (200, 0, 0))])
        assert torch.get_num_threads() == 2  # ultralytics alone would leave cpu_count - 1 (1 on 2 cores)
    finally:
        torch.set_num_threads(before)


class _RecordingModel:
    """Stands in for ultralytics' YOLO: keeps what it was given, finds one car at fixed input coordinates."""

    def __init__(self) -> None:
        self.inputs: list[Image.Image] = []

    def predict(self, images: list[Image.Image], **_: object) -> list[SimpleNamespace]:
        self.inputs += images
        boxes = SimpleNamespace(xyxy=torch.tensor([[10.0, 20.0, 600.0, 600.0]]), conf=torch.tensor([0.9]))
        boxes.cls = torch.tensor([2.0])
        return [SimpleNamespace(boxes=boxes) for _ in images]


def _recording_detector(**config: object) -> tuple[VehicleDetector, _RecordingModel]:
    detector = VehicleDetector.__new__(VehicleDetector)
    detector.config, detector.device = DetectorConfig(**config), "cpu"  # type: ignore[arg-type]
    detector._model, detector.class_names = _RecordingModel(), {2: "car"}
    return detector, detector._model


def test_a_small_photo_is_padded_at_its_own_size_and_its_boxes_stay_in_its_pixels() -> None:
    """``enlarge_small`` false: a photo smaller than the input on both sides goes in at its own size in the
    top-left corner of a grey canvas; boxes come back in its pixels, clipped to it."""
    photo = make_car_image(1, (200, 0, 0), size=(128, 96))
    detector, model = _recording_detector(enlarge_small=False)
    (found,) = detector.detect([photo])
    (given,) = model.inputs
    assert given.size == (640, 640) and given.crop((0, 0, 128, 96)).tobytes() == photo.tobytes()
    assert given.getpixel((300, 300)) == (114, 114, 114)
    assert [tuple(d.box.as_list()) for d in found] == [(10.0, 20.0, 128.0, 96.0)]
    large = make_car_image(2, (0, 0, 200), size=(800, 600))
    assert detector_input(large, 640, enlarge_small=False) is large  # larger photos: ultralytics fits them
    assert detector_input(photo, 640, enlarge_small=True) is photo  # the old rule: enlarged by ultralytics
    grey = Image.new("L", (64, 48), 30)
    assert detector_input(grey, 640, enlarge_small=False).getpixel((5, 5)) == (30, 30, 30)
