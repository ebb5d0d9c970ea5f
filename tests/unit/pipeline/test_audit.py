from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carsearch.errors import EmptyGalleryError
from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline
from carsearch.pipeline.audit import audit_index
from tests.conftest import CLASS_COLOURS, TEST_OVERRIDES, build_gallery, make_car_image


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> GalleryIndex:
    root = build_gallery(tmp_path_factory.mktemp("audit") / "g", classes=3, per_class=6)
    # the same bytes under two labels, and a blue car filed as red
    shutil.copy(root / "class_0" / "img_0.jpg", root / "class_1" / "copy_of_red.jpg")
    make_car_image(4242, CLASS_COLOURS[2]).save(root / "class_0" / "mislabelled_blue.jpg")
    out = root.parent / "idx"
    Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"]).index(root, out)
    return GalleryIndex.load(out)


def test_exact_duplicates_with_different_labels_are_reported(audited: GalleryIndex) -> None:
    report = audit_index(audited, k=5)
    exact = [d for d in report.duplicates if d.kind == "exact"]
    assert len(exact) == 1
    assert {Path(exact[0].path_a).name, Path(exact[0].path_b).name} == {"img_0.jpg", "copy_of_red.jpg"}
    assert {exact[0].label_a, exact[0].label_b} == {"class_0", "class_1"}


def test_item_whose_neighbours_disagree_is_flagged(audited: GalleryIndex) -> None:
    report = audit_index(audited, k=5, max_agree=0.2)
    flagged = {Path(d.path).name: d for d in report.disagreements}
    assert "mislabelled_blue.jpg" in flagged
    assert flagged["mislabelled_blue.jpg"].majority_label == "class_2"
    assert all(d.agree <= 0.2 for d in report.disagreements)
    correct = [n for n in flagged if n.startswith("img_")]
    assert len(correct) <= 2  # well-separated colour classes: almost nothing else is flagged


def test_audit_needs_labels(tmp_path: Path) -> None:
    empty = GalleryIndex(4, {})
    with pytest.raises(EmptyGalleryError):
        audit_index(empty)
