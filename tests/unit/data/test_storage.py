"""Sources and images behind URIs: ``file://`` through pyarrow's local filesystem, ``s3://`` against a local
S3 server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carsearch.data import storage
from carsearch.data.decode import decode_item
from carsearch.data.images import load_image
from carsearch.data.sources import SourceItem, read_folder, read_source
from carsearch.errors import DataSourceError, ImageLoadError
from tests.conftest import CLASS_COLOURS, ObjectStore, build_gallery, make_car_image


@pytest.mark.parametrize(
    ("value", "uri"),
    [("s3://bucket/a.jpg", True), ("S3://bucket/a.jpg", True), ("gs://b/x", True), ("file:///tmp/x", True),
     ("/tmp/x", False), ("relative/x.jpg", False), ("C:\\cars\\x.jpg", False), (Path("s3://b/x"), False),
     ("https://example.com/yolo11n.pt", False), ("grpc://triton:8001/yolo", False)],
)  # fmt: skip
def test_is_uri_tells_uris_from_local_paths(value: str | Path, uri: bool) -> None:
    assert storage.is_uri(value) is uri
    assert isinstance(storage.as_location(str(value)), str if uri else Path)


def test_join_parent_and_suffix_keep_the_uris_scheme_host_and_options() -> None:
    csv = "s3://bucket/cars/list.CSV?region=eu-west-1"
    folder = storage.parent(csv)
    assert folder == "s3://bucket/cars?region=eu-west-1"
    assert storage.suffix(csv) == ".csv" and storage.suffix("s3://b/x.jpg?a=1") == ".jpg"
    assert storage.join(folder, "audi/1.jpg") == "s3://bucket/cars/audi/1.jpg?region=eu-west-1"
    assert storage.join(folder, "../other/2.jpg") == "s3://bucket/other/2.jpg?region=eu-west-1"
    assert storage.join(folder, "gs://elsewhere/3.jpg") == "gs://elsewhere/3.jpg"
    assert storage.join(Path("/data"), "x/4.jpg") == Path("/data/x/4.jpg")
    assert storage.join(Path("/data"), "/abs/5.jpg") == Path("/abs/5.jpg")


def test_file_uris_read_and_list(tmp_path: Path) -> None:
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "top.png").write_bytes(b"top")
    root = tmp_path.as_uri()
    assert storage.read_bytes(f"{root}/a/x.jpg") == b"x"
    assert storage.list_files(root) == [("a/x.jpg", f"{root}/a/x.jpg"), ("top.png", f"{root}/top.png")]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{root}/missing.jpg")
    with pytest.raises(IsADirectoryError):
        storage.read_bytes(f"{root}/a")
    assert storage.identity(f"{root}/a/x.jpg") == f"{root}/a/x.jpg"
    assert storage.identity(tmp_path / "a" / ".." / "top.png") == str(tmp_path / "top.png")


def test_one_read_contract_oserror_then_image_load_error_or_empty_bytes(tmp_path: Path) -> None:
    """``storage.read_bytes`` raises ``OSError`` for a path and a URI alike; images turn it into
    ``ImageLoadError`` (one message each), content keys into ``b""``."""
    for missing in (tmp_path / "gone.jpg", f"{tmp_path.as_uri()}/gone.jpg"):
        with pytest.raises(FileNotFoundError) as info:
            storage.read_bytes(missing)
        assert storage.read_failure(info.value) in str(info.value) and storage.read_failure(info.value)
        with pytest.raises(ImageLoadError, match=f"^cannot read {missing}: "):
            load_image(missing)
        assert storage.read_bytes_or_empty(missing) == b""
    assert storage.read_failure(FileNotFoundError(2, "No such file or directory", "x")) == "No such file or directory"
    assert storage.read_failure(OSError("s3://b/x: refused")) == "s3://b/x: refused"  # a store's message as it is
    with pytest.raises(ImageLoadError, match=f"^{tmp_path} is a directory, not an image$"):
        load_image(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"x")
    assert storage.read_bytes_or_empty(tmp_path / "x.jpg") == b"x"


def test_a_folder_behind_a_file_uri_reads_like_the_folder(tiny_gallery: Path) -> None:
    for name in ("audi", "audi-a4"):  # listed folder by folder, in the local walk's order
        (tiny_gallery / name).mkdir()
        make_car_image(5, CLASS_COLOURS[3]).save(tiny_gallery / name / "x.jpg")
    local = read_folder(tiny_gallery)
    remote = read_source(tiny_gallery.as_uri())
    assert [(i.label, Path(i.path).name) for i in remote] == [(i.label, i.path.name) for i in local]
    assert all(isinstance(i.path, str) and i.path.startswith("file://") for i in remote)
    assert storage.read_bytes(remote[0].path) == local[0].path.read_bytes()


def upload_gallery(store: ObjectStore, tmp_path: Path) -> tuple[Path, str]:
    gallery = build_gallery(tmp_path / "gallery", classes=2, per_class=2)
    (gallery / ".thumbnails").mkdir()
    (gallery / ".thumbnails" / "t.jpg").write_bytes(b"hidden")
    (gallery / "class_0" / "notes.txt").write_text("not an image")
    (gallery / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    make_car_image(9, CLASS_COLOURS[0]).save(gallery / "class_0" / "a car #3%.jpg")  # needs percent-encoding
    return gallery, store.upload(gallery, f"{store.bucket()}/photos")


def test_a_folder_in_s3_lists_its_images_with_labels(object_store: ObjectStore, tmp_path: Path) -> None:
    gallery, uri = upload_gallery(object_store, tmp_path)
    items = read_source(uri)
    assert [(i.label, i.path) for i in items] == [
        ("class_0", f"{uri}/class_0/a%20car%20%233%25.jpg"),
        ("class_0", f"{uri}/class_0/img_0.jpg"),
        ("class_0", f"{uri}/class_0/img_1.jpg"),
        ("class_1", f"{uri}/class_1/broken.jpg"),
        ("class_1", f"{uri}/class_1/img_0.jpg"),
        ("class_1", f"{uri}/class_1/img_1.jpg"),
    ]  # sorted; hidden folders and non-images left out, as in a local folder
    assert read_source(uri + "/") == items
    assert storage.name(items[0].path) == "a car #3%.jpg"
    assert load_image(items[0].path).tobytes() == load_image(gallery / "class_0" / "a car #3%.jpg").tobytes()
    image = load_image(items[1].path)
    assert image.size == (160, 120) and image.tobytes() == load_image(gallery / "class_0" / "img_0.jpg").tobytes()
    decoded = decode_item(0, items[3], {}, 1024)
    local = decode_item(0, SourceItem(gallery / "class_1" / "broken.jpg"), {}, 1024)
    assert (decoded.status, decoded.reason, decoded.content_hash) == ("error", local.reason, local.content_hash)
    missing = decode_item(1, SourceItem(f"{uri}/class_0/gone.jpg"), {}, 1024)
    assert missing.status == "error" and missing.reason.startswith("cannot read file")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(f"{uri}/class_0/gone.jpg")


def test_a_csv_in_s3_resolves_its_rows_against_its_own_folder(object_store: ObjectStore, tmp_path: Path) -> None:
    bucket = object_store.bucket()
    folder = tmp_path / "upload"
    (folder / "lists").mkdir(parents=True)
    make_car_image(1, CLASS_COLOURS[0]).save(folder / "a.jpg")
    make_car_image(2, CLASS_COLOURS[1]).save(folder / "lists" / "c d.jpg")
    rows = "path,label,x1,y1,x2,y2,view\n../a.jpg,audi,1,2,30,40,side\ns3://other/b.jpg,bmw,,,,,front\n"
    rows += "c d.jpg,citroen,,,,,side\n"
    (folder / "lists" / "cars.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # Excel's BOM too
    uri = object_store.upload(folder, bucket)
    items = read_source(f"{uri}/lists/cars.csv")
    assert [(i.path, i.label, i.box.as_list() if i.box else None) for i in items] == [
        (f"{uri}/a.jpg", "audi", [1.0, 2.0, 30.0, 40.0]),
        ("s3://other/b.jpg", "bmw", None),
        (f"{uri}/lists/c%20d.jpg", "citroen", None),
    ]
    assert load_image(items[2].path).tobytes() == load_image(folder / "lists" / "c d.jpg").tobytes()
    only_side = read_source(f"{uri}/lists/cars.csv", where={"view": "side"})
    assert [i.label for i in only_side] == ["audi", "citroen"]


def test_object_store_sources_fail_with_clear_errors(object_store: ObjectStore) -> None:
    bucket = object_store.bucket()
    with pytest.raises(DataSourceError, match="does not exist"):
        read_source(f"s3://{bucket}/nothing.csv")
    with pytest.raises(DataSourceError, match="no image files"):
        read_source(f"s3://{bucket}/empty-prefix")
    with pytest.raises(DataSourceError, match="apply to CSV sources only"):
        read_source(f"s3://{bucket}/x", where={"view": "side"})
    with pytest.raises(DataSourceError, match="does not exist"):
        read_source("s3://no-such-bucket-here/x.csv")
    with pytest.raises(DataSourceError, match="cannot read source .*Unexpected query parameter"):
        read_source(f"s3://{bucket}/x.csv?no_such_option=1")
    with pytest.raises(DataSourceError, match="cannot read source"):
        read_source(f"s3://{bucket}/x.csv?endpoint_override=127.0.0.1:9&scheme=http")  # nothing listens there


def test_local_copy_downloads_once_per_content_and_leaves_local_paths_alone(
    object_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARSEARCH_CACHE", str(tmp_path / "cache"))
    bucket = object_store.bucket()
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "yolo.tflite").write_bytes(b"weights v1")
    uri = object_store.upload(folder, f"{bucket}/m") + "/yolo.tflite"
    first = storage.local_copy(uri)
    assert first.parent == tmp_path / "cache" / "downloads" and first.name.endswith("-yolo.tflite")
    assert first.read_bytes() == b"weights v1" and storage.local_copy(uri) == first
    assert storage.name(uri) == "yolo.tflite" and storage.name(folder / "yolo.tflite") == "yolo.tflite"
    assert storage.stamp(uri).startswith("10:") and storage.stamp(f"s3://{bucket}/m/none") == ""

    (folder / "yolo.tflite").write_bytes(b"weights v2")  # the object changes: a new copy, the old one kept
    object_store.upload(folder, f"{bucket}/m")
    second = storage.local_copy(uri)
    assert second != first and second.read_bytes() == b"weights v2" and first.read_bytes() == b"weights v1"
    assert storage.local_copy(folder / "yolo.tflite") == folder / "yolo.tflite"
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"s3://{bucket}/m/missing.pt")


def test_models_missing_from_the_store_fail_with_clear_errors(object_store: ObjectStore) -> None:
    from carsearch.config import DetectorConfig, EmbedderConfig
    from carsearch.detector import VehicleDetector
    from carsearch.embedder import Embedder
    from carsearch.errors import ModelLoadError

    bucket = object_store.bucket()
    with pytest.raises(ModelLoadError, match=f"cannot fetch detector weights 's3://{bucket}/yolo.pt'.*does not exist"):
        VehicleDetector(DetectorConfig(weights=f"s3://{bucket}/yolo.pt"))
    with pytest.raises(ModelLoadError, match=f"checkpoint not found: s3://{bucket}/embedder.pt"):
        Embedder.from_config(EmbedderConfig(runtime="torch", model=f"s3://{bucket}/embedder.pt"))


def test_a_hash_sign_in_a_given_uri_is_part_of_the_name(tmp_path: Path) -> None:
    folder = tmp_path / "set#1"
    build_gallery(folder, classes=1, per_class=2)
    items = read_source(folder.as_uri().replace("%23", "#"))  # as a user would type it
    assert [storage.name(i.path) for i in items] == ["img_0.jpg", "img_1.jpg"]
    assert storage.read_bytes(items[0].path) == (folder / "class_0" / "img_0.jpg").read_bytes()


@pytest.mark.parametrize("bad", ["s3:///no-bucket.jpg", "file://otherhost/x.jpg"])
def test_uris_pyarrow_refuses_are_recorded_errors_not_crashes(bad: str) -> None:
    decoded = decode_item(0, SourceItem(bad), {}, 1024)
    assert decoded.status == "error" and decoded.reason.startswith("cannot read file")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(bad)
    with pytest.raises(DataSourceError, match="cannot read source|does not exist"):
        read_source(bad.replace(".jpg", ".csv"))
    assert storage.stamp(bad) == ""
