"""Search, evaluation and the Python API on a tiny synthetic gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.config import load_config
from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline
from carsearch.pipeline.loaded_models import Models
from carsearch.types import FLAG_LOW_CONFIDENCE, FLAG_NO_DETECTION, BBox, Detection
from tests.conftest import CLASS_COLOURS, TEST_OVERRIDES, build_gallery, make_car_image


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path, Path]:
    root = build_gallery(tmp_path_factory.mktemp("g") / "gallery")
    out = root.parent / "idx"
    pipe = Pipeline.from_config(overrides=TEST_OVERRIDES + ["crop=false"])
    pipe.index(root, out)
    return pipe, root, out


def test_search_returns_ranked_hits_with_labels(built: tuple[Pipeline, Path, Path]) -> None:
    pipe, root, out = built
    result = pipe.search(out, root / "class_1" / "img_0.jpg", k=5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert result.hits[0].path.endswith("class_1/img_0.jpg")
    assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert result.hits[0].label == "class_1"
    assert result.query_plan.flags == ("raw",)


def test_exclude_self_drops_the_identical_file(built: tuple[Pipeline, Path, Path]) -> None:
    pipe, root, out = built
    result = pipe.search(out, root / "class_1" / "img_0.jpg", k=5, exclude_self=True)
    assert len(result.hits) == 5
    assert all(not h.path.endswith("class_1/img_0.jpg") for h in result.hits)


def test_new_photo_of_a_class_finds_its_class_first(built: tuple[Pipeline, Path, Path]) -> None:
    pipe, _, out = built
    result = pipe.search(out, make_car_image(777, CLASS_COLOURS[2]), k=4)
    assert sum(h.label == "class_2" for h in result.hits) >= 3


def test_for_index_rebuilds_the_same_processing(built: tuple[Pipeline, Path, Path]) -> None:
    _, root, out = built
    again = Pipeline.for_index(out, ["runtime.workers=0"])
    assert again.config.crop is False and again.config.embedder.image_size == 64
    assert again.search(out, root / "class_0" / "img_1.jpg", k=1).hits[0].path.endswith("class_0/img_1.jpg")


def test_index_built_by_another_embedder_is_refused(built: tuple[Pipeline, Path, Path]) -> None:
    _, root, out = built
    other = Pipeline.from_config(overrides=TEST_OVERRIDES + ["crop=false", "embedder.image_size=96"])
    with pytest.raises(IndexMismatchError, match="another embedder"):
        other.search(out, root / "class_0" / "img_1.jpg")


def test_empty_gallery_is_a_clear_error(built: tuple[Pipeline, Path, Path], tmp_path: Path) -> None:
    pipe, root, _ = built
    empty = GalleryIndex(pipe.embedder.dim, pipe.manifest())
    with pytest.raises(EmptyGalleryError):
        pipe.search(empty, root / "class_0" / "img_1.jpg")


def test_evaluate_matches_a_direct_computation(built: tuple[Pipeline, Path, Path]) -> None:
    pipe, _, out = built
    evaluation = pipe.evaluate(out)
    index = GalleryIndex.load(out)
    sims = index.vectors @ index.vectors.T
    np.fill_diagonal(sims, -np.inf)
    labels = np.array([r.label for r in index.records])
    top1 = labels[sims.argmax(1)] == labels
    assert evaluation.metrics.recall_at[1] == pytest.approx(top1.mean())
    assert evaluation.items == evaluation.labelled_items == 12
    assert evaluation.metrics.recall_at[1] > 1 / 3  # colour classes are easy: far above chance


def test_unlabelled_index_cannot_be_evaluated(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        make_car_image(i, CLASS_COLOURS[0]).save(folder / f"{i}.jpg")
    pipe = Pipeline.from_config(overrides=TEST_OVERRIDES + ["crop=false"])
    pipe.index(folder, tmp_path / "idx")
    with pytest.raises(EmptyGalleryError, match="labelled"):
        pipe.evaluate(tmp_path / "idx")


@pytest.mark.parametrize("mode", ["raw", "detector"])
def test_a_large_indexed_photo_searched_as_a_query_gets_its_own_vector(
    tmp_path: Path, tiny_yolo: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch job downscales photos over ``runtime.max_image_side`` before detection; queries (Python API,
    CLI, demo) are prepared by the same function, so an indexed photo finds itself with its own vector."""
    from carsearch.cli import main
    from carsearch.demo.handlers import DemoBackend, search

    folder = tmp_path / "big" / "cls"
    folder.mkdir(parents=True)
    for i in range(3):
        make_car_image(i, CLASS_COLOURS[i], size=(800, 600)).save(folder / f"{i}.png")
    crop = ["crop=false"] if mode == "raw" else [f"detector.weights={tiny_yolo}", "detector.image_size=160"]
    pipe = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "runtime.max_image_side=200", *crop])
    pipe.index(tmp_path / "big", tmp_path / "idx")
    gallery = pipe.open_index(tmp_path / "idx")
    paths = [record.path for record in gallery.records]
    query = Pipeline.for_index(tmp_path / "idx")  # as `carsearch search` and the demo build it
    for i in range(3):
        path = folder / f"{i}.png"
        row = paths.index(str(path))
        plan, _, vector = query.embed_image(Image.open(path).convert("RGB"))
        np.testing.assert_allclose(vector, gallery.vectors[row], atol=1e-5)
        box = gallery.records[row].box
        assert (plan.region.as_list() if plan.region is not None else None) == box  # in the photo's pixels
        assert "downscaled" in plan.flags and "downscaled" in gallery.records[row].flags
    assert main(["search", str(tmp_path / "idx"), str(folder / "1.png"), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["path"] == str(folder / "1.png") and hit["score"] > 1 - 1e-5
    backend = DemoBackend.load(tmp_path / "idx")
    out = search(backend, folder / "2.png", k=1)
    assert out.error is None and out.state.crop is not None
    demo_vector = backend.main.pipeline.embedder.embed([out.state.crop])[0]
    np.testing.assert_allclose(demo_vector, gallery.vectors[paths.index(str(folder / "2.png"))], atol=1e-5)


class FixedDetector:
    """Finds the same boxes in every image."""

    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        return [list(self.detections) for _ in images]


class NamedEmbedder:
    identity = {"fingerprint": "test"}


def test_a_box_below_the_confidence_is_cropped_only_with_a_fallback() -> None:
    unsure = Detection(BBox(10, 10, 90, 60), 0.1, "car")
    image = Image.new("RGB", (100, 80))
    fallback = Pipeline.from_config(overrides=TEST_OVERRIDES)  # the default: fallback_confidence 0.05
    fallback.models._detector = FixedDetector([unsure])  # type: ignore[assignment]
    (plan,) = fallback.plan(image)
    assert plan.detection == unsure and plan.flags == (FLAG_LOW_CONFIDENCE,)
    sure = Detection(BBox(20, 20, 50, 40), 0.4, "car")  # passes the default confidence 0.35
    fallback.models._detector = FixedDetector([unsure, sure])  # type: ignore[assignment]
    (plan,) = fallback.plan(image)
    assert plan.detection == sure and plan.flags == ()
    (plan,) = fallback.plan(image, min_score=0.5)  # the demo's slider raises the confidence, not the floor
    assert plan.detection == sure and plan.flags == (FLAG_LOW_CONFIDENCE,)
    strict = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "detector.fallback_confidence=null"])
    strict.models._detector = FixedDetector([unsure])  # type: ignore[assignment]
    (plan,) = strict.plan(image)
    assert plan.region is None and plan.flags == (FLAG_NO_DETECTION,)


def test_the_manifest_names_a_fallback_only_when_there_is_one() -> None:
    """Indexes built before detector.fallback_confidence existed keep their processing settings (and resume)."""
    for overrides, expected in ((["detector.fallback_confidence=null"], None), ([], 0.05)):
        models = Models(load_config(None, [*TEST_OVERRIDES, *overrides]), embedder=NamedEmbedder())  # type: ignore[arg-type]
        assert (models.manifest().crop_detector or {}).get("fallback_confidence") == expected


def test_the_manifest_names_padded_small_photos_only_when_they_are() -> None:
    """Indexes built before detector.enlarge_small existed enlarged small photos: their processing stays."""
    for overrides, expected in ((["detector.enlarge_small=true"], None), (["detector.enlarge_small=false"], False)):
        models = Models(load_config(None, [*TEST_OVERRIDES, *overrides]), embedder=NamedEmbedder())  # type: ignore[arg-type]
        assert (models.manifest().crop_detector or {}).get("enlarge_small", None) == expected


def _in_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as a user might hold it in ``mode`` (RGBA with a real alpha gradient, P quantised)."""
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        return rgba
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "array", "bytes"])
def test_python_queries_in_any_form_match_the_same_picture_read_from_a_file(
    built: tuple[Pipeline, Path, Path], tmp_path: Path, mode: str
) -> None:
    """A PIL image in any mode, a uint8 array or encoded bytes is prepared exactly as its file would be."""
    pipe, _, out = built
    picture = _in_mode(make_car_image(4242, CLASS_COLOURS[1]), "RGB" if mode in ("array", "bytes") else mode)
    path = tmp_path / ("query.tif" if mode == "CMYK" else "query.png")  # lossless either way
    picture.save(path)
    query = {"array": np.asarray(picture), "bytes": path.read_bytes()}.get(mode, picture)
    by_path = pipe.search(out, path, k=3)
    held = pipe.search(out, query, k=3)
    assert [h.item_id for h in held.hits][:1] == [h.item_id for h in by_path.hits][:1]
    assert np.allclose([h.score for h in held.hits], [h.score for h in by_path.hits], atol=1e-5)


def test_a_query_of_an_unusable_kind_is_a_clear_error(built: tuple[Pipeline, Path, Path]) -> None:
    from carsearch.errors import ImageLoadError

    pipe, _, out = built
    with pytest.raises(ImageLoadError, match="uint8 array"):
        pipe.search(out, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ImageLoadError, match="expected a path"):
        pipe.search(out, 42)  # type: ignore[arg-type]
