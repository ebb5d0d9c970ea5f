from __future__ import annotations

import json
from pathlib import Path

import pytest

from carsearch.errors import IndexMismatchError
from carsearch.index import GalleryIndex, Manifest
from carsearch.index.manifest import FORMAT, MANIFEST, VERSION, FileDigest
from tests.unit.index.test_gallery import IDENTITY, records, unit_vectors

WEIGHTS = {"name": "y.pt", "sha256": "0" * 64, "bytes": 3, "source": "/w/y.pt", "file": "detector/y.pt"}
BUILT = {
    "embedder": {**IDENTITY, "train_labels": ["a", "b"]},
    "processing": {"crop": True, "crop_source": "detector", "detector": {"weights": "y.pt"}, "max_image_side": 9},
    "config": {"detector": {"weights": "/w/y.pt"}, "embedder": {"checkpoint": None}},
    "versions": {"carsearch": "0"},
    "created": "2024-01-01T00:00:00+0000",
    "detector_weights": WEIGHTS,
}


def saved(tmp_path: Path, manifest: dict[str, object] | Manifest = BUILT) -> Path:
    index = GalleryIndex.from_arrays(unit_vectors(12), records(12), manifest)
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def test_a_saved_manifest_round_trips_byte_for_byte(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    text = (folder / MANIFEST).read_text()
    manifest = Manifest.read(folder)
    assert manifest.to_json() == text
    assert (manifest.format, manifest.version, manifest.dim, manifest.count) == (FORMAT, VERSION, 8, 12)
    assert manifest.paths_relative_to_index and manifest.index_info["kind"] == manifest.index_kind == "flat"
    assert isinstance(manifest.digest("vectors.npy"), FileDigest) and manifest.digest("nothing") is None
    assert manifest.train_labels == ["a", "b"] and manifest.model_name == "test"
    assert manifest.detector_name == "y.pt" and manifest.configured_detector_weights == "/w/y.pt"
    manifest.write(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_text() == text
    assert GalleryIndex.load(folder).manifest == manifest


def test_unknown_keys_and_nulls_are_written_back_as_read(tmp_path: Path) -> None:
    """A manifest from a newer minor change (an extra key) or with a null section keeps both when re-written."""
    data = {**json.loads((saved(tmp_path) / MANIFEST).read_text()), "future": {"x": [1]}, "versions": None}
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.versions is None and manifest.extra == {"future": {"x": [1]}, "versions": None}
    assert json.loads(manifest.to_json()) == data


def test_an_unsaved_manifest_writes_only_what_it_holds() -> None:
    assert Manifest().to_dict() == {}
    assert Manifest.from_dict({"embedder": IDENTITY}).to_dict() == {"embedder": IDENTITY}
    assert Manifest().embedder_identity == {} and Manifest().train_labels is None and Manifest().model_name is None
    assert Manifest().crop_detector is None and Manifest().detector_name is None


def test_a_version_1_manifest_is_upgraded_by_meaning(tmp_path: Path) -> None:
    """Version 1: ``index_kind`` without ``index``, no ``paths`` (stored as typed), no checksums, an older config."""
    data = json.loads((saved(tmp_path) / MANIFEST).read_text())
    for key in ("index", "paths", "files"):
        del data[key]
    data["version"] = 1
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.version == 1 and manifest.index_info == {"kind": "flat"}
    assert not manifest.paths_relative_to_index and manifest.relative_paths == 0
    assert not manifest.has_checksums and manifest.digest("vectors.npy") is None
    assert manifest.built_config is not None
    assert manifest.built_config["embedder"] == {"model": "imagenet"}  # checkpoint: null meant the backbone
    assert manifest.config == BUILT["config"]  # read as written: re-saving keeps it
    assert json.loads(manifest.to_json()) == data


def test_committed_sets_what_a_save_knows() -> None:
    index = {"kind": "ivf", "nprobe": 4}
    manifest = Manifest.from_dict(BUILT)
    done = manifest.committed(dim=8, count=3, index=index, files={}, relative_paths=2)
    assert (done.format, done.version, done.dim, done.count) == (FORMAT, VERSION, 8, 3)
    assert (done.index_kind, done.index, done.relative_paths) == ("ivf", index, 2)
    assert manifest.format is None and manifest.count is None  # the original is left as it was


def test_recording_detector_weights_sets_the_config_source() -> None:
    manifest = Manifest(processing={"detector": {"weights": "a.pt"}}, config={"detector": {"weights": "a.pt"}})
    manifest.record_detector_weights(WEIGHTS)
    assert manifest.detector_weights == WEIGHTS and manifest.configured_detector_weights == "/w/y.pt"
    manifest.detector_name = "y.pt"
    assert manifest.processing == {"detector": {"weights": "y.pt"}}
    with pytest.raises(ValueError, match="raw index"):
        Manifest(processing={"detector": None}).detector_name = "y.pt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"manifest.json cannot be read \(JSONDecodeError\); rebuild it"),
        ("[1, 2]", "is not a carsearch index manifest"),
        ('{"format": "something-else"}', "is not a carsearch index manifest"),
        (f'{{"format": "{FORMAT}", "version": {VERSION + 1}, "files": []}}', f"has index version {VERSION + 1}; "),
        (f'{{"format": "{FORMAT}", "version": "two"}}', r"is damaged \(version 'two'\)"),
        (f'{{"format": "{FORMAT}", "version": 2, "dim": "8"}}', r"is damaged \(dim is str, not int\)"),
        (f'{{"format": "{FORMAT}", "version": 2, "embedder": [1]}}', r"is damaged \(embedder is list, not dict\)"),
        (f'{{"format": "{FORMAT}", "version": 2, "files": {{"vectors.npy": 5}}}}', r"files.vectors.npy has no size"),
    ],
)
def test_a_damaged_or_foreign_manifest_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(IndexMismatchError, match=message):
        Manifest.read(tmp_path)
    with pytest.raises(IndexMismatchError, match=message):
        GalleryIndex.load(tmp_path)


def test_a_missing_or_undecodable_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexMismatchError, match=r"is not a carsearch index \(no manifest.json\)"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(IndexMismatchError, match=r"cannot be read \(UnicodeDecodeError\)"):
        Manifest.read(tmp_path)


def test_a_manifest_without_counts_is_damaged(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    data = json.loads((folder / MANIFEST).read_text())
    del data["count"]
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexMismatchError, match=r"is damaged \(no dim or count\)"):
        GalleryIndex.load(folder)
