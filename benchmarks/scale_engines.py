"""The Ray engine against the local engine on the same photos: throughput and identical output.

    python benchmarks/scale.py engines --n 500 --detector-weights ../shared/models/yolov8n_coco_int8.tflite

Images: the first N rows of ``--source`` (default: the shared Stanford Cars photos, 128×96 thumbnails with
the car and its background); detector crops, pretrained embedder, each engine into a fresh index folder
under ``--work``. Reported: wall time of each ``Pipeline.index`` call (the Ray one includes starting and
stopping its local cluster and actors), images/s end to end and after the first batch arrived (the
steady state, without start-up), the ratios, and whether the two indexes hold the same
records in the same order with vectors within 1e-5. ``--ray-cpus`` sizes the local Ray cluster.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "stanford_cars" / "photos.csv"


def first_rows(source: Path, n: int, folder: Path) -> Path:
    """A CSV of the first ``n`` rows of ``source`` with absolute paths (the images stay where they are)."""
    with source.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:n]
    for row in rows:
        row["path"] = str((source.parent / row["path"]).resolve())
    out = folder / "photos.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def compare_engines(
    source: Path, n: int, weights: str, work: Path, ray_cpus: int | None, actors: tuple[int, int] | None = None
) -> dict[str, Any]:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.index_job import IndexJob
    from carsearch.pipeline.ray_engine import RayOptions

    stamps: list[tuple[float, int]] = []  # (time, images) of each batch of outcomes the job records
    record = IndexJob.record

    def timed_record(job: IndexJob, outcomes: list) -> None:
        if outcomes:
            stamps.append((time.perf_counter(), len(outcomes)))
        record(job, outcomes)

    IndexJob.record = timed_record  # type: ignore[method-assign]
    work.mkdir(parents=True, exist_ok=True)
    csv_path = first_rows(source, n, work)
    pipeline = Pipeline.from_config(overrides=[f"detector.weights={weights}", "runtime.device=cpu"])
    pipeline.embedder, pipeline.detector  # noqa: B018 - load models before timing, as both engines' drivers do
    with csv_path.open(newline="") as handle:  # the files in the page cache for both engines alike
        for row in csv.DictReader(handle):
            Path(row["path"]).read_bytes()
    results: dict[str, Any] = {}
    for engine in ("local", "ray"):
        out = work / f"index-{engine}"
        options = None
        if engine == "ray":
            pools = {"detector_actors": (actors[0],) * 2, "embedder_actors": (actors[1],) * 2} if actors else {}
            options = RayOptions(num_cpus=ray_cpus, **pools)
        stamps.clear()
        tic = time.perf_counter()
        report = pipeline.index(csv_path, out, engine=engine, ray=options)
        seconds = time.perf_counter() - tic
        streamed = [n for _, n in stamps[1:]]  # images after the first batch arrived: the steady state
        steady = sum(streamed) / (stamps[-1][0] - stamps[0][0]) if len(stamps) > 1 else None
        results[engine] = {
            "seconds": round(seconds, 2),
            "images": report.processed,
            "errors": report.errors,
            "images_per_second": round(report.processed / seconds, 2),
            "first_batch_after_s": round(stamps[0][0] - tic, 2) if stamps else None,
            "steady_images_per_second": round(steady, 2) if steady else None,
            "detect_seconds": report.detect_seconds,
            "embed_seconds": report.embed_seconds,
        }
    local, ray = GalleryIndex.load(work / "index-local"), GalleryIndex.load(work / "index-ray")
    same_records = [r.to_dict() for r in local.records] == [r.to_dict() for r in ray.records]
    gap = float(np.abs(local.vectors - ray.vectors).max()) if same_records else None
    return {
        "n": n,
        "source": source.name,
        "cores": os.cpu_count(),
        "ray_cpus": ray_cpus or os.cpu_count(),
        "ray_actors": "default: half the CPUs each" if actors is None else f"{actors[0]} detector, {actors[1]} embed",
        "machine": platform.processor() or platform.machine(),
        **results,
        "throughput_ratio_ray_to_local": round(
            results["ray"]["images_per_second"] / results["local"]["images_per_second"], 3
        ),
        "steady_ratio_ray_to_local": round(
            results["ray"]["steady_images_per_second"] / results["local"]["steady_images_per_second"], 3
        ),
        "same_records_same_order": same_records,
        "max_vector_difference": gap,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| engine | images | wall time | images/s | first batch after | images/s after it | detector s | embedder s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine in ("local", "ray"):
        r = result[engine]
        lines.append(
            f"| {engine} | {r['images']} | {r['seconds']:.1f} s | {r['images_per_second']:.2f} | "
            f"{r['first_batch_after_s']:.1f} s | {r['steady_images_per_second']:.2f} | "
            f"{r['detect_seconds']:.1f} | {r['embed_seconds']:.1f} |"
        )
    lines.append(
        f"\nray / local throughput: {result['throughput_ratio_ray_to_local']:.2f}× end to end, "
        f"{result['steady_ratio_ray_to_local']:.2f}× after the first batch; same records in the same "
        f"order: {result['same_records_same_order']}; max |Δvector|: {result['max_vector_difference']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SHARED_PHOTOS)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--detector-weights", default=str(ROOT.parent / "shared/models/yolov8n_coco_int8.tflite"))
    parser.add_argument("--work", type=Path, default=None, help="where the two indexes go (default: a temp dir)")
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--ray-actors", help="D,E: detector and embedder actors (default: the engine's own)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="carsearch-engines-"))
    actors = tuple(int(a) for a in args.ray_actors.split(",")) if args.ray_actors else None
    result = compare_engines(args.source, args.n, args.detector_weights, work, args.ray_cpus, actors)  # type: ignore[arg-type]
    print(table(result))
    return result
