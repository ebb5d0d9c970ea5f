"""Batched searches: one detector and one embedder call per batch, the same answers as one by one, any car."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from carsearch.data.cropping import apply_plan
from carsearch.data.images import load_image
from carsearch.demo.backend import DemoBackend
from carsearch.demo.handlers import pick_car, search
from carsearch.demo.searching import SearchRequest, ask, search_batch
from carsearch.errors import CarSearchError
from tests.conftest import SHARED


def _queries(gallery: Path) -> list[Path]:
    return [gallery / f"class_{c}" / f"img_{i}.jpg" for c in range(3) for i in range(2)]


def test_a_batch_makes_one_detector_and_one_embedder_call_and_answers_as_one_by_one(
    cropped_backend: DemoBackend, demo_indexes: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery = demo_indexes[0]
    requests = [SearchRequest(load_image(path), k=3) for path in _queries(gallery)]
    alone = [search_batch(cropped_backend, [request])[0] for request in requests]
    models = cropped_backend.main.pipeline.models
    calls = {"detect": [], "embed": []}
    detect, embed = models.detector.detect, models.embedder.embed
    monkeypatch.setattr(models.detector, "detect", lambda images: calls["detect"].append(len(images)) or detect(images))
    monkeypatch.setattr(models.embedder, "embed", lambda crops: calls["embed"].append(len(crops)) or embed(crops))
    together = search_batch(cropped_backend, requests)
    assert calls == {"detect": [6], "embed": [6]}
    for one, many in zip(alone, together, strict=True):
        assert not isinstance(one, CarSearchError) and not isinstance(many, CarSearchError)
        assert [h.item_id for h in one.main.hits] == [h.item_id for h in many.main.hits]
        # a batch of crops embeds within float error of one crop alone (rounding to 5 places could split them)
        assert np.allclose([h.score for h in one.main.hits], [h.score for h in many.main.hits], atol=1e-5)
    # car 1 is the car Pipeline.search picks (the largest): the same hits as `carsearch search`
    pipeline = cropped_backend.main.pipeline
    reference = pipeline.search(cropped_backend.main.gallery, _queries(gallery)[0], k=3)
    assert [h.item_id for h in reference.hits] == [h.item_id for h in together[0].main.hits]


def test_concurrent_searches_share_batches(cropped_backend: DemoBackend, demo_indexes: tuple[Path, Path, Path]) -> None:
    gallery = demo_indexes[0]
    queries = _queries(gallery) * 3
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        answers = list(pool.map(lambda q: ask(cropped_backend, SearchRequest(load_image(q), k=2)), queries))
    assert len(answers) == 18 and all(len(a.main.hits) == 2 for a in answers)
    assert cropped_backend.batcher is not None and cropped_backend.batcher.largest > 1
    assert all({"detect", "embed", "search", "queue", "total"} <= set(a.timings_ms) for a in answers)


def test_every_car_is_numbered_largest_first_and_any_can_be_searched(
    cropped_backend: DemoBackend, demo_indexes: tuple[Path, Path, Path]
) -> None:
    query = demo_indexes[0] / "class_1" / "img_2.jpg"
    first = search(cropped_backend, query, k=4)
    assert first.car == 1 and len(first.cars) >= 2  # the tiny YOLO finds several boxes
    _, cars, _ = first.state.views[0]
    areas = [plan.detection.box.area for plan in cars.plans]
    assert areas == sorted(areas, reverse=True)
    second = search(cropped_backend, query, k=4, car=2)
    assert second.car == 2 and "Car 2 of" in second.message
    # the tiny YOLO ties equal boxes, so compare within one answer: car 2's crop is its second box, not its first
    _, cars, _ = second.state.views[0]
    assert second.state.crop is not None and cars.plans[1].region != cars.plans[0].region
    expected = apply_plan(load_image(query), cars.plans[1])
    assert np.array_equal(np.asarray(second.state.crop), np.asarray(expected))
    missing = search(cropped_backend, query, k=4, car=len(first.cars) + 1)
    assert missing.error and f"there is no car {len(first.cars) + 1} in this photo" in missing.message


def test_a_click_picks_the_smallest_car_box_under_it(
    cropped_backend: DemoBackend, demo_indexes: tuple[Path, Path, Path]
) -> None:
    out = search(cropped_backend, demo_indexes[0] / "class_0" / "img_2.jpg", k=2)
    _, cars, _ = out.state.views[0]
    scale = out.state.scale
    for plan in cars.plans:
        box = plan.detection.box
        x, y = (box.x1 + box.x2) / 2 * scale, (box.y1 + box.y2) / 2 * scale
        picked = pick_car(out.state, x, y)
        assert picked is not None
        chosen = cars.plans[picked - 1].detection.box
        assert chosen.x1 <= x / scale <= chosen.x2 and chosen.area <= box.area
    assert pick_car(out.state, -5, -5) is None


def test_k_and_car_out_of_range_are_refused_in_one_line(cropped_backend: DemoBackend) -> None:
    image = load_image(Path(cropped_backend.examples()[0]))
    with pytest.raises(CarSearchError, match="k must be between 1 and 50"):
        SearchRequest(image, k=0)
    with pytest.raises(CarSearchError, match="car numbers start at 1"):
        SearchRequest(image, car=0)


STREET = SHARED / "data" / "street" / "street_10.jpg"
STREET_DETECTOR = SHARED / "models" / "yolov8n_coco_int8.tflite"


def test_a_real_street_photo_with_several_cars_searches_each(tmp_path: Path) -> None:
    """The offline COCO detector on a shared street photo (skips without ../shared)."""
    if not STREET.exists() or not STREET_DETECTOR.exists():
        pytest.skip("../shared street photos or detector absent")
    pytest.importorskip("ai_edge_litert")
    from carsearch.pipeline import Pipeline
    from tests.conftest import TEST_OVERRIDES, build_gallery

    gallery = build_gallery(tmp_path / "gallery", classes=2, per_class=2)
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, f"detector.weights={STREET_DETECTOR}"]).index(
        gallery, tmp_path / "idx"
    )
    backend = DemoBackend.load(tmp_path / "idx")
    first = search(backend, STREET, k=2)
    assert len(first.cars) >= 2, first.message
    second = search(backend, STREET, k=2, car=2)
    assert second.car == 2 and not np.array_equal(np.asarray(first.crop), np.asarray(second.crop))


def test_another_car_of_the_searched_photo_is_the_one_shown_under_its_number(
    cropped_backend: DemoBackend, demo_indexes: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Picking car 2 after a search reuses the cars shown (no new detection, whose boxes could differ); a new
    confidence or another photo detects again."""
    query = demo_indexes[0] / "class_1" / "img_0.jpg"
    first = search(cropped_backend, query, k=3, confidence=0.25)
    assert len(first.cars) >= 2
    detector = cropped_backend.main.pipeline.models.detector
    calls: list[int] = []
    detect = detector.detect
    monkeypatch.setattr(detector, "detect", lambda images: calls.append(len(images)) or detect(images))
    second = search(cropped_backend, query, k=3, confidence=0.25, car=2, last=first.state)
    assert calls == [] and second.car == 2
    assert second.state.views[0][1] is first.state.views[0][1]  # the very cars that were numbered on the page
    other = demo_indexes[0] / "class_2" / "img_1.jpg"
    for photo, confidence in [(query, 0.3), (other, 0.25)]:
        search(cropped_backend, photo, k=3, confidence=confidence, car=1, last=first.state)
    assert calls == [1, 1]
