"""Search, evaluation and the Python API on a tiny synthetic gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline
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
    with pytest.raises(IndexMismatchError, match="different embedder"):
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
