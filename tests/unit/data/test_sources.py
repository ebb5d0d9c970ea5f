"""carsearch.data.sources: folder trees, CSVs, the Stanford Cars devkit and the Kaggle layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from carsearch.data.sources import (
    SourceItem,
    read_csv,
    read_folder,
    read_kaggle,
    read_source,
    read_stanford_devkit,
)
from carsearch.errors import DataSourceError
from carsearch.types import BBox

CLASS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012"]


def _image(path: Path, colour=(120, 30, 30), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _by_name(items: list[SourceItem]) -> dict[str, SourceItem]:
    return {item.path.name: item for item in items}


# --------------------------------------------------------------------------- .mat fixtures


def _cell(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def _struct_array(rows: list[dict[str, object]], fields: list[str]) -> np.ndarray:
    array = np.zeros(len(rows), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        array[i] = tuple(row[f] for f in fields)
    return array.reshape(1, -1)


def _class_names() -> np.ndarray:
    return np.array(CLASS_NAMES, dtype=object).reshape(1, -1)


def _devkit_row(x1, y1, x2, y2, cls, **extra) -> dict[str, object]:
    row = {
        "bbox_x1": _cell(x1, np.uint16),
        "bbox_y1": _cell(y1, np.uint16),
        "bbox_x2": _cell(x2, np.uint16),
        "bbox_y2": _cell(y2, np.uint16),
        "class": _cell(cls, np.uint8),
    }
    row.update(extra)
    return row


COMBINED_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
SPLIT_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]

# (file, x1, y1, x2, y2, class (1-based), is_test) — 1-based inclusive devkit boxes
COMBINED_ROWS = [
    ("000001.jpg", 112, 7, 853, 717, 1, 0),
    ("000002.jpg", 48, 24, 441, 202, 1, 1),
    ("000003.jpg", 7, 4, 277, 180, 2, 0),
    ("000004.jpg", 33, 50, 197, 150, 3, 1),
]


@pytest.fixture
def combined_devkit(tmp_path) -> Path:
    """Stanford Cars "cars_annos.mat" layout: one struct array over car_ims/, with a 'test' flag."""
    root = tmp_path / "stanford"
    rows = []
    for name, x1, y1, x2, y2, cls, test in COMBINED_ROWS:
        _image(root / "car_ims" / name)
        rows.append(_devkit_row(x1, y1, x2, y2, cls, relative_im_path=f"car_ims/{name}", test=_cell(test, np.uint8)))
    savemat(
        root / "cars_annos.mat",
        {"annotations": _struct_array(rows, COMBINED_FIELDS), "class_names": _class_names()},
    )
    return root


TRAIN_ROWS = [
    ("00001.jpg", 39, 116, 569, 375, 3),
    ("00002.jpg", 36, 116, 868, 587, 1),
    ("00003.jpg", 85, 109, 601, 381, 2),
]
TEST_ROWS = [("00001.jpg", 30, 52, 246, 147, 2), ("00002.jpg", 100, 19, 576, 203, 3)]


def _save_split_annos(path: Path, rows, with_class: bool = True) -> None:
    fields = SPLIT_FIELDS if with_class else [f for f in SPLIT_FIELDS if f != "class"]
    records = [_devkit_row(x1, y1, x2, y2, cls, fname=name) for name, x1, y1, x2, y2, cls in rows]
    savemat(path, {"annotations": _struct_array(records, fields)})


@pytest.fixture
def split_devkit(tmp_path) -> Path:
    """Stanford Cars devkit: devkit/cars_meta.mat + cars_{train,test}_annos.mat, images in cars_{split}/."""
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _class_names()})
    for part, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        for name, *_ in rows:
            _image(root / f"cars_{part}" / name)
        _save_split_annos(root / "devkit" / f"cars_{part}_annos.mat", rows)
    return root


def test_mat_fixtures_look_like_the_real_devkit(combined_devkit, split_devkit):
    mat = loadmat(combined_devkit / "cars_annos.mat")
    annotations = mat["annotations"]
    assert annotations.shape == (1, len(COMBINED_ROWS))
    assert annotations.dtype.names == tuple(COMBINED_FIELDS)
    first = annotations[0, 0]
    assert first["relative_im_path"].shape == (1,) and first["relative_im_path"][0] == "car_ims/000001.jpg"
    assert first["bbox_x1"].shape == (1, 1) and first["bbox_x1"][0, 0] == 112
    assert first["class"].shape == (1, 1) and first["test"].shape == (1, 1)
    names = mat["class_names"]
    assert names.shape == (1, 3) and names[0, 1][0] == "Acura RL Sedan 2012"

    train = loadmat(split_devkit / "devkit" / "cars_train_annos.mat")["annotations"]
    assert train.shape == (1, 3) and set(train.dtype.names) == set(SPLIT_FIELDS)
    assert train[0, 0]["fname"][0] == "00001.jpg" and train[0, 0]["bbox_y2"].shape == (1, 1)


# --------------------------------------------------------------------------- Stanford devkit


def test_combined_devkit_all(combined_devkit):
    items = read_stanford_devkit(combined_devkit)
    assert [item.path for item in items] == [combined_devkit / "car_ims" / r[0] for r in COMBINED_ROWS]
    assert all(item.path.exists() for item in items)
    assert [item.label for item in items] == [CLASS_NAMES[r[5] - 1] for r in COMBINED_ROWS]
    # 1-based inclusive → 0-based, exclusive end
    assert items[0].box == BBox(111.0, 6.0, 853.0, 717.0)
    assert items[3].box == BBox(32.0, 49.0, 197.0, 150.0)
    assert items[0].box.width == 853 - 112 + 1


def test_combined_devkit_splits(combined_devkit):
    train = read_stanford_devkit(combined_devkit, "train")
    test = read_stanford_devkit(combined_devkit, "test")
    assert [i.path.name for i in train] == ["000001.jpg", "000003.jpg"]
    assert [i.path.name for i in test] == ["000002.jpg", "000004.jpg"]
    assert [i.label for i in test] == [CLASS_NAMES[0], CLASS_NAMES[2]]
    assert len(read_stanford_devkit(combined_devkit, "all")) == len(train) + len(test)


def test_split_devkit(split_devkit):
    train = read_stanford_devkit(split_devkit, "train")
    test = read_stanford_devkit(split_devkit, "test")
    everything = read_stanford_devkit(split_devkit, "all")
    assert [i.path for i in train] == [split_devkit / "cars_train" / r[0] for r in TRAIN_ROWS]
    assert [i.path for i in test] == [split_devkit / "cars_test" / r[0] for r in TEST_ROWS]
    assert all(i.path.exists() for i in everything)
    assert everything == train + test
    assert [i.label for i in train] == [CLASS_NAMES[2], CLASS_NAMES[0], CLASS_NAMES[1]]
    assert [i.label for i in test] == [CLASS_NAMES[1], CLASS_NAMES[2]]
    assert train[0].box == BBox(38.0, 115.0, 569.0, 375.0)
    assert test[1].box == BBox(99.0, 18.0, 576.0, 203.0)


def test_split_devkit_needs_meta(split_devkit):
    (split_devkit / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DataSourceError, match="cars_meta.mat"):
        read_stanford_devkit(split_devkit)


def test_split_devkit_missing_annotations(split_devkit):
    (split_devkit / "devkit" / "cars_test_annos.mat").unlink()
    assert len(read_stanford_devkit(split_devkit, "train")) == len(TRAIN_ROWS)
    with pytest.raises(DataSourceError, match="cars_test_annos.mat"):
        read_stanford_devkit(split_devkit, "test")
    with pytest.raises(DataSourceError, match="cars_test_annos.mat"):
        read_stanford_devkit(split_devkit, "all")


def test_unlabelled_test_annotations_are_refused(split_devkit):
    # The real devkit's cars_test_annos.mat has no 'class' field.
    _save_split_annos(split_devkit / "devkit" / "cars_test_annos.mat", TEST_ROWS, with_class=False)
    with pytest.raises(DataSourceError, match="no class labels.*withlabels"):
        read_stanford_devkit(split_devkit, "test")


def test_withlabels_file_is_used_when_devkit_test_annos_absent(split_devkit):
    (split_devkit / "devkit" / "cars_test_annos.mat").unlink()
    _save_split_annos(split_devkit / "cars_test_annos_withlabels.mat", TEST_ROWS)
    test = read_stanford_devkit(split_devkit, "test")
    assert [i.label for i in test] == [CLASS_NAMES[1], CLASS_NAMES[2]]
    assert [i.path for i in test] == [split_devkit / "cars_test" / r[0] for r in TEST_ROWS]


def test_withlabels_file_is_preferred_over_unlabelled_devkit_annos(split_devkit):
    _save_split_annos(split_devkit / "devkit" / "cars_test_annos.mat", TEST_ROWS, with_class=False)
    _save_split_annos(split_devkit / "cars_test_annos_withlabels.mat", TEST_ROWS)
    test = read_stanford_devkit(split_devkit, "test")
    assert [i.label for i in test] == [CLASS_NAMES[1], CLASS_NAMES[2]]


# --------------------------------------------------------------------------- Kaggle


def _kaggle(root: Path) -> Path:
    """Kaggle "stanford-car-dataset-by-classes-folder": car_data/car_data/{train,test}/<class>/, anno CSVs."""
    data = root / "car_data" / "car_data"
    _image(data / "train" / CLASS_NAMES[2] / "00001.jpg")
    _image(data / "train" / CLASS_NAMES[0] / "00002.jpg")
    _image(data / "train" / CLASS_NAMES[0] / "00099.jpg")  # not in the CSV → no box
    _image(data / "test" / CLASS_NAMES[1] / "00001.jpg")
    (root / "anno_train.csv").write_text("00001.jpg,39,116,569,375,3\n00002.jpg,36,116,868,587,1\n")
    (root / "anno_test.csv").write_text("00001.jpg,30,52,246,147,2\n")
    (root / "names.csv").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def test_kaggle_layout(tmp_path):
    root = _kaggle(tmp_path / "kaggle")
    train = read_kaggle(root, "train")
    test = read_kaggle(root, "test")
    assert len(train) == 3 and len(test) == 1
    by_name = _by_name(train)
    assert by_name["00001.jpg"].label == CLASS_NAMES[2]
    assert by_name["00001.jpg"].box == BBox(38.0, 115.0, 569.0, 375.0)
    assert by_name["00002.jpg"].label == CLASS_NAMES[0]
    assert by_name["00002.jpg"].box == BBox(35.0, 115.0, 868.0, 587.0)
    assert by_name["00099.jpg"].box is None
    # the test split's 00001.jpg has its own box, not the train one
    assert test[0].label == CLASS_NAMES[1]
    assert test[0].box == BBox(29.0, 51.0, 246.0, 147.0)
    assert test[0].path == root / "car_data" / "car_data" / "test" / CLASS_NAMES[1] / "00001.jpg"
    assert read_kaggle(root, "all") == train + test


def test_kaggle_tolerates_header_and_malformed_lines(tmp_path):
    root = _kaggle(tmp_path / "kaggle")
    (root / "anno_train.csv").write_text(
        "image,x1,y1,x2,y2,class\n00001.jpg,39,116,569,375,3\nbroken\n00002.jpg,a,b,c,d,1\n"
    )
    by_name = _by_name(read_kaggle(root, "train"))
    assert by_name["00001.jpg"].box == BBox(38.0, 115.0, 569.0, 375.0)
    assert by_name["00002.jpg"].box is None


def test_kaggle_missing_split(tmp_path):
    root = _kaggle(tmp_path / "kaggle")
    (root / "anno_test.csv").unlink()
    assert len(read_kaggle(root, "train")) == 3
    with pytest.raises(DataSourceError, match="anno_test.csv"):
        read_kaggle(root, "test")


# --------------------------------------------------------------------------- folder


def test_read_folder_labels(tmp_path):
    root = tmp_path / "gallery"
    _image(root / "red" / "a.jpg")
    # label = the first sub-folder; extensions are case-insensitive
    _image(root / "red" / "nested" / "deeper" / "b.PNG")
    _image(root / "blue" / "c.jpeg")
    _image(root / "top.webp")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "blue" / "data.json").write_text("{}")
    (root / "blue" / "noext").write_bytes(b"x")
    _image(root / "blue" / ".hidden.jpg")
    items = read_folder(root)
    assert [i.path for i in items] == sorted(i.path for i in items)
    by_name = _by_name(items)
    assert set(by_name) == {"a.jpg", "b.PNG", "c.jpeg", "top.webp"}
    assert by_name["a.jpg"].label == "red"
    assert by_name["b.PNG"].label == "red"
    assert by_name["c.jpeg"].label == "blue"
    assert by_name["top.webp"].label is None
    assert all(i.box is None for i in items)


def test_read_folder_matches_tiny_gallery(tiny_gallery):
    items = read_folder(tiny_gallery)
    assert len(items) == 12
    assert sorted({i.label for i in items}) == ["class_0", "class_1", "class_2"]
    assert all(sum(i.label == f"class_{c}" for i in items) == 4 for c in range(3))


def test_read_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no image files"):
        read_folder(tmp_path / "empty")
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "readme.md").write_text("hello")
    _image(only_text / ".DS_hidden.png")
    with pytest.raises(DataSourceError, match="no image files"):
        read_folder(only_text)


def test_read_folder_ignores_hidden_folders(tmp_path):
    root = tmp_path / "gallery"
    _image(root / "red" / "a.jpg")
    _image(root / ".thumbnails" / "a.jpg")
    _image(root / "red" / ".ipynb_checkpoints" / "b.jpg")
    items = read_folder(root)
    assert [i.path for i in items] == [root / "red" / "a.jpg"]


# --------------------------------------------------------------------------- CSV


def test_read_csv_relative_paths_boxes_and_extra_columns(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    csv_path = folder / "items.csv"
    csv_path.write_text(
        "path,label,x1,y1,x2,y2,notes\n"
        "imgs/a.jpg,sedan,10,20,110.5,90,front\n"
        "imgs/b.jpg,suv,,,,,\n"
        "/abs/c.jpg,,1,2,3,4,\n"
    )
    items = read_csv(csv_path)
    assert items == [
        SourceItem(folder / "imgs" / "a.jpg", "sedan", BBox(10.0, 20.0, 110.5, 90.0)),
        SourceItem(folder / "imgs" / "b.jpg", "suv", None),
        SourceItem(Path("/abs/c.jpg"), None, BBox(1.0, 2.0, 3.0, 4.0)),
    ]


def test_read_csv_without_label_or_box_columns(tmp_path):
    csv_path = tmp_path / "paths.csv"
    csv_path.write_text("path\nx.jpg\nsub/y.png\n")
    items = read_csv(csv_path)
    assert [i.path for i in items] == [tmp_path / "x.jpg", tmp_path / "sub" / "y.png"]
    assert all(i.label is None and i.box is None for i in items)


def test_read_csv_missing_path_column(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("file,label\na.jpg,x\n")
    with pytest.raises(DataSourceError, match="'path' column"):
        read_csv(csv_path)


def test_read_csv_headerless(tmp_path):
    csv_path = tmp_path / "noheader.csv"
    csv_path.write_text("a.jpg,sedan\n")
    with pytest.raises(DataSourceError, match="'path' column"):
        read_csv(csv_path)


@pytest.mark.parametrize(
    "box",
    ["10,20,abc,90", "10,20,,90", "50,20,10,90", "10,90,50,20", "nan,1,2,3"],
    ids=["not-a-number", "partial", "x2<x1", "y2<y1", "nan"],
)
def test_read_csv_bad_box(tmp_path, box):
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text(f"path,label,x1,y1,x2,y2\nok.jpg,a,1,2,3,4\nbad.jpg,b,{box}\n")
    with pytest.raises(DataSourceError, match=r"boxes\.csv:3: bad box"):
        read_csv(csv_path)


def test_read_csv_empty_path_and_empty_file(tmp_path):
    csv_path = tmp_path / "holes.csv"
    csv_path.write_text("path,label\na.jpg,x\n,y\n")
    with pytest.raises(DataSourceError, match=r"holes\.csv:3: empty path"):
        read_csv(csv_path)
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(DataSourceError, match="lists no images"):
        read_csv(header_only)


def test_read_csv_with_utf8_bom(tmp_path):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("path,label\na.jpg,Škoda Octavia\n".encode("utf-8-sig"))
    items = read_csv(csv_path)
    assert items == [SourceItem(tmp_path / "a.jpg", "Škoda Octavia")]


# --------------------------------------------------------------------------- read_source dispatch


def test_read_source_dispatch(tmp_path, combined_devkit, split_devkit, tiny_gallery):
    assert read_source(combined_devkit) == read_stanford_devkit(combined_devkit)
    assert read_source(combined_devkit, "test") == read_stanford_devkit(combined_devkit, "test")
    assert read_source(split_devkit, "train") == read_stanford_devkit(split_devkit, "train")
    kaggle = _kaggle(tmp_path / "kaggle")
    assert read_source(kaggle, "test") == read_kaggle(kaggle, "test")
    assert read_source(kaggle) == read_kaggle(kaggle, "all")
    assert read_source(tiny_gallery) == read_folder(tiny_gallery)
    csv_path = tmp_path / "list.CSV"
    csv_path.write_text("path,label\na.jpg,x\n")
    assert read_source(csv_path) == read_csv(csv_path)
    assert read_source(str(csv_path)) == [SourceItem(tmp_path / "a.jpg", "x")]


def test_read_source_kaggle_with_annotations_one_level_down(tmp_path):
    root = _kaggle(tmp_path / "kaggle")
    for name in ("anno_train.csv", "anno_test.csv"):
        (root / name).rename(root / "car_data" / name)
    items = read_source(root, "train")
    assert _by_name(items)["00001.jpg"].box == BBox(38.0, 115.0, 569.0, 375.0)


def test_read_source_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        read_source(tmp_path / "missing")
    image = _image(tmp_path / "single.jpg")
    with pytest.raises(DataSourceError, match="must be a .csv"):
        read_source(image)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no image files"):
        read_source(tmp_path / "empty")


def test_read_csv_where_filters_rows(tmp_path):
    csv_path = tmp_path / "photos.csv"
    csv_path.write_text("path,label,visible\na.jpg,x,1\nb.jpg,y,0\nc.jpg,z,1\n")
    assert [i.path.name for i in read_source(csv_path, where={"visible": "1"})] == ["a.jpg", "c.jpg"]
    with pytest.raises(DataSourceError, match="no column nope to filter on"):
        read_source(csv_path, where={"nope": "1"})
    with pytest.raises(DataSourceError, match="lists no images where"):
        read_source(csv_path, where={"visible": "2"})
    with pytest.raises(DataSourceError, match="CSV sources only"):
        read_source(tmp_path, where={"visible": "1"})
