"""Index records at scale: Arrow columns (``items.arrow``, version 2) against version 1's Python objects.

    python benchmarks/scale.py records --n 1000000

Synthetic records shaped like a fleet's (camera-frame paths, half labelled, SHA-256 hashes, boxes, image
sizes). Measures the RAM of version 1's in-memory records (``ItemRecord`` objects parsed from JSON lines),
the Arrow file's size, the RAM an opened index's records take (memory-mapped), and the per-query costs
the pipeline pays: the content-hash lookup of ``search --exclude-self`` and reading the k hits' records.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from carsearch.index.records import ItemRecord, RecordTable


def fleet_records(n: int, seed: int = 0) -> list[ItemRecord]:
    rng = np.random.default_rng(seed)
    boxes = rng.uniform(0, 1000, size=(n, 4)).round(2)
    return [
        ItemRecord(
            path=f"/data/fleet/cam{i % 997:04d}/2026-11-{1 + i % 30:02d}/frame_{i:010d}.jpg",
            label=f"Make{i % 50} Model{i % 977} {2000 + i % 25}" if i % 2 == 0 else None,
            content_hash=hashlib.sha256(i.to_bytes(8, "little")).hexdigest(),
            box=boxes[i].tolist(),
            det_score=0.25 + (i % 75) / 100,
            det_class="car",
            flags=[],
            image_size=[1920, 1080],
        )
        for i in range(n)
    ]


def private_ram() -> int:
    gc.collect()
    return psutil.Process().memory_full_info().uss  # private pages: a memory-mapped file's clean pages are not


def timed(fn: Any, repeat: int) -> float:
    """Median milliseconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1000)
    return float(np.median(times))


def run(n: int, work: Path) -> dict[str, Any]:
    records = fleet_records(n)
    lines = [json.dumps(r.to_dict(), sort_keys=True) for r in records]
    jsonl_bytes = sum(len(line) + 1 for line in lines)
    del records
    before = private_ram()
    objects = [ItemRecord.from_dict(json.loads(line)) for line in lines]  # what version 1 held after load
    object_ram = private_ram() - before
    table = RecordTable.of(objects)
    del objects, lines
    path = work / "items.arrow"
    with path.open("wb") as handle:
        table.write(handle)
    table_ram = table.table.nbytes
    del table
    before = private_ram()
    opened = RecordTable.read(path)
    opened_ram = private_ram() - before
    heap = pa.total_allocated_bytes()
    rng = np.random.default_rng(1)
    queries = [opened[int(i)].content_hash for i in rng.integers(0, n, 5)]
    hash_ms = timed(lambda: [opened.ids_with_hash(q) for q in queries], 3) / len(queries)
    hits_ms = timed(lambda: [opened[int(i)] for i in rng.integers(0, n, 10)], 20)
    labelled_ms = timed(opened.labelled_ids, 3)
    return {
        "n": n,
        "v1_objects_ram_bytes_per_record": round(object_ram / n, 1),
        "v1_jsonl_bytes_per_record": round(jsonl_bytes / n, 1),
        "arrow_file_bytes_per_record": round(path.stat().st_size / n, 1),
        "arrow_in_ram_bytes_per_record": round(table_ram / n, 1),
        "opened_private_ram_bytes_per_record": round(opened_ram / n, 2),
        "opened_arrow_heap_bytes": heap,
        "exclude_self_hash_lookup_ms": round(hash_ms, 2),
        "read_10_hit_records_ms": round(hits_ms, 3),
        "labelled_ids_ms": round(labelled_ms, 1),
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.n, Path(work))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return result
