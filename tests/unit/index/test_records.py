from __future__ import annotations

import json
import os
import tracemalloc
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from carsearch.config import IndexConfig
from carsearch.errors import IndexMismatchError
from carsearch.index import GalleryIndex, ItemRecord
from carsearch.index.gallery import file_digest
from carsearch.index.records import SCHEMA, RecordTable
from tests.unit.index.test_gallery import IDENTITY, make_index, unit_vectors


def varied(n: int) -> list[ItemRecord]:
    """Records that use every field: unlabelled rows, missing boxes, flags, extra crops."""
    return [
        ItemRecord(
            path=f"/photos/cam{i % 3}/frame_{i:05d}.jpg",
            label=None if i % 4 == 3 else f"Make Model {i % 5} 20{10 + i % 3}",
            content_hash=f"{i // 2:064x}",  # pairs of rows share bytes (one file under two paths)
            box=None if i % 5 == 0 else [i + 0.25, 2.5, 300.125 + i, 199.0],
            det_score=None if i % 5 == 0 else 0.5 + i / 1000,
            det_class=None if i % 5 == 0 else ("car", "truck")[i % 2],
            flags=["no_detection"] if i % 5 == 0 else (["downscaled"] if i % 7 == 0 else []),
            image_size=[1920, 1080 + i],
            crop_index=i % 2,
        )
        for i in range(n)
    ]


def test_schema_lists_the_record_fields_in_order() -> None:
    assert SCHEMA.names == [f.name for f in fields(ItemRecord)]


def test_records_round_trip_through_a_memory_mapped_file(tmp_path: Path) -> None:
    records = varied(50)
    table = RecordTable.of(records)
    with (tmp_path / "items.arrow").open("wb") as handle:
        table.write(handle)
    loaded = RecordTable.read(tmp_path / "items.arrow")
    assert len(loaded) == 50 and loaded == records and list(loaded) == records
    assert loaded[-1] == records[-1] and loaded[7] == records[7]
    assert loaded[10:13] == records[10:13] and loaded.take([4, 1]) == [records[4], records[1]]
    with pytest.raises(IndexError):
        loaded[50]


def test_column_questions_match_a_walk_over_the_records() -> None:
    records = varied(40)
    table = RecordTable.of(records)
    assert table.labelled_ids().tolist() == [i for i, r in enumerate(records) if r.label is not None]
    assert table.ids_with_hash(records[9].content_hash).tolist() == [8, 9]
    assert table.ids_with_hash("no such hash").tolist() == []
    assert table.count_flag("no_detection") == sum("no_detection" in r.flags for r in records) == 8
    assert table.column("label") == [r.label for r in records]
    assert table.concat(varied(3)) == records + varied(3)


def test_records_cost_a_fraction_of_python_objects_and_no_heap_once_opened(tmp_path: Path) -> None:
    lines = [json.dumps(r.to_dict()) for r in varied(5_000)]
    tracemalloc.start()
    objects = [ItemRecord.from_dict(json.loads(line)) for line in lines]  # what version 1 kept in RAM
    object_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    table = RecordTable.of(objects)
    assert table.table.nbytes * 2 < object_bytes, (table.table.nbytes, object_bytes)
    with (tmp_path / "items.arrow").open("wb") as handle:
        table.write(handle)
    before = pa.total_allocated_bytes()
    opened = RecordTable.read(tmp_path / "items.arrow")
    assert pa.total_allocated_bytes() - before < table.table.nbytes / 100  # the buffers are the file's pages
    assert opened[4_999] == objects[4_999]


def test_an_unreadable_record_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "items.arrow").write_bytes(b'{"path": "not arrow"}\n')
    with pytest.raises(ValueError, match="not a readable record file"):
        RecordTable.read(tmp_path / "items.arrow")


def test_a_version_1_index_with_json_lines_records_opens_and_is_rewritten_as_version_2(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    index = make_index(12)
    index.save(folder)
    # Turn it into what carsearch wrote before: items.jsonl, version 1.
    lines = b"".join((json.dumps(r.to_dict(), sort_keys=True) + "\n").encode() for r in index.records)
    (folder / "items.arrow").unlink()
    (folder / "items.jsonl").write_bytes(lines)
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {k: v for k, v in manifest["files"].items() if k != "items.arrow"}
    manifest.update(version=1, files={**files, "items.jsonl": file_digest(lines)})
    del manifest["paths"]  # version 1 stored paths as typed
    (folder / "manifest.json").write_text(json.dumps(manifest))

    old = GalleryIndex.load(folder, IndexConfig(use_gpu=False), embedder_identity=IDENTITY)
    assert old.records == index.records
    old.add(unit_vectors(1, seed=9), [ItemRecord(path="new.jpg", label="c0", content_hash="hnew")])
    old.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "items.arrow", "manifest.json", "vectors.npy"]
    new = GalleryIndex.load(folder, IndexConfig(use_gpu=False))
    assert new.manifest.version == 2 and len(new) == 13 and new.records[-1].path == os.path.abspath("new.jpg")
    assert np.array_equal(new.vectors[:12], index.vectors)


def test_a_damaged_version_1_record_file_is_still_refused(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    make_index(4).save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "items.arrow").unlink()
    (folder / "items.jsonl").write_bytes(b"{}\n")
    manifest.update(version=1, files={**manifest["files"], "items.jsonl": {"bytes": 99, "sha256": "0" * 64}})
    manifest["files"].pop("items.arrow")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="damaged: items.jsonl"):
        GalleryIndex.load(folder)
