"""The Ray engine's input side at fleet scale: the driver turning N source items into Ray Data blocks.

    python benchmarks/scale.py plan --n 1000000

N synthetic camera-frame items (no files read). ``arrow``: what the engine does
(:func:`carsearch.pipeline.ray_engine.input_blocks` → ``ray.data.from_arrow``: Arrow tables, at most
``MAX_INPUT_BLOCKS`` blocks); ``items``: what it did before (one Python dict per row →
``ray.data.from_items`` with one block per batch); ``items_capped``: Python rows in as many blocks as
``arrow`` (which of the two changes pays). Reported per method: seconds to build the rows, to create
the dataset, and to stream every row back to the driver through Ray Data (the engine's stages replaced by
nothing, so this is Ray Data's cost per block and row), the block count and the driver's peak RSS. Each
method runs in its own process on a local 2-CPU Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("arrow", "items", "items_capped")


def measure(method: str, n: int, batch: int) -> dict[str, Any]:
    """One method in this process (called in a child: peak RSS is per process)."""
    import ray

    from carsearch.data.sources import SourceItem
    from carsearch.pipeline.ray_engine import input_blocks

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [SourceItem(Path(f"/data/cams/cam{i % 500:03d}/frame_{i:09d}.jpg"), f"c{i % 1000}") for i in range(n)]
    tic = time.perf_counter()
    if method == "arrow":
        blocks = input_blocks(items, {}, batch)
        rows_s = time.perf_counter() - tic
        tic = time.perf_counter()
        dataset = ray.data.from_arrow(blocks)
        count = len(blocks)
    else:
        rows = [
            {"position": i, "item": json.dumps([str(it.path), it.label, None]), "indexed": ""}
            for i, it in enumerate(items)
        ]
        rows_s = time.perf_counter() - tic
        tic = time.perf_counter()
        count = max(1, -(-n // batch))
        if method == "items_capped":
            count = len(input_blocks(items, {}, batch))  # the engine's block count (this call is not timed)
            tic = time.perf_counter()
        dataset = ray.data.from_items(rows, override_num_blocks=count)
    dataset_s = time.perf_counter() - tic
    tic = time.perf_counter()
    streamed = sum(len(b["position"]) for b in dataset.iter_batches(batch_size=None, batch_format="numpy"))
    stream_s = time.perf_counter() - tic
    ray.shutdown()
    assert streamed == n
    return {
        "method": method,
        "blocks": count,
        "rows_seconds": round(rows_s, 2),
        "dataset_seconds": round(dataset_s, 2),
        "stream_seconds": round(stream_s, 2),
        "total_seconds": round(rows_s + dataset_s + stream_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(measure(args.method, args.n, args.batch)))
        return {}
    runs = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--n", str(args.n), "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| method | blocks | rows | dataset | stream to driver | total | driver peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['method']} | {r['blocks']:,} | {r['rows_seconds']:.1f} s | {r['dataset_seconds']:.1f} s | "
            f"{r['stream_seconds']:.1f} s | {r['total_seconds']:.1f} s | {r['peak_rss_mb']:,} MB |"
        )
    return {"n": args.n, "batch": args.batch, "cores": os.cpu_count(), "machine": platform.machine(), "runs": runs}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
