"""The batch job's merge: row order, replacement, pruning, part-by-part vector gathering, chunk files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carsearch.index.records import ItemRecord, RecordTable
from carsearch.pipeline.chunks import Chunk, ChunkStore
from carsearch.pipeline.index_job import gather_rows, merge_order, merged_vectors


def table(*keys: str) -> RecordTable:
    return RecordTable.of(ItemRecord(path=k, label=None, content_hash=f"h-{k}") for k in keys)


def test_newest_group_of_a_key_replaces_the_older_and_takes_its_position() -> None:
    index = table("a", "b", "b", "c")  # b: two cars of one photo (selection "all")
    run1 = table("b", "d")  # b re-indexed with one car
    run2 = table("a", "e", "a")  # a re-indexed with two cars
    ids, dropped = merge_order([index, run1, run2])
    keys = RecordTable.concatenate([index, run1, run2]).take(ids).column("path")
    assert keys == ["c", "b", "d", "a", "a", "e"] and dropped == 0
    assert ids.tolist() == [3, 4, 5, 6, 8, 7]


def test_pruning_drops_keys_outside_the_listing_and_counts_them() -> None:
    ids, dropped = merge_order([table("a", "b", "b", "c"), table("d")], keep={"a", "d"})
    assert ids.tolist() == [0, 4] and dropped == 2


def test_vectors_are_gathered_part_by_part_into_a_memory_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 4)).astype(np.float32) for n in (5, 3, 4)]
    loads: list[int] = []

    def loader(i: int):  # noqa: ANN202
        return lambda: loads.append(i) or parts[i]

    ids = np.array([7, 0, 11, 9, 1])  # rows 0-4 are part 0's, 5-7 part 1's, 8-11 part 2's
    out = merged_vectors(tmp_path / "merged.npy", len(ids), 4)
    assert isinstance(out, np.memmap)
    gather_rows([(len(p), loader(i)) for i, p in enumerate(parts)], ids, out)
    assert np.array_equal(out, np.concatenate(parts)[ids]) and loads == [0, 1, 2]
    loads.clear()
    gather_rows([(len(p), loader(i)) for i, p in enumerate(parts)], np.array([10, 2]), np.empty((2, 4), np.float32))
    assert loads == [0, 2]  # a part none of whose rows is kept is never read
    assert merged_vectors(tmp_path / "empty.npy", 0, 4).shape == (0, 4)


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_chunks_read_back_their_records_without_vectors_and_their_vectors_alone(tmp_path: Path, fmt: str) -> None:
    store = ChunkStore(tmp_path / "work", fmt)
    records = [
        ItemRecord(path=f"p{i}", label="x", content_hash=f"h{i}", box=[0, 1, 2, 3], crop_index=i) for i in range(3)
    ]
    vectors = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    errors = [{"path": "bad.jpg", "reason": "not an image"}]
    store.write(Chunk(records, list(vectors), errors, 4), 6)
    store.write(Chunk([], [], [], 1), 6)
    first, second = store.paths()
    meta = store.read_meta(first)
    assert meta.records == records and meta.errors == errors and meta.images == 4 and meta.path == first
    assert np.array_equal(store.read_vectors(first), vectors)
    assert len(store.read_meta(second).records) == 0 and store.read_vectors(second).shape == (0, 6)
