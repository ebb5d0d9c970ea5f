"""Throughput of the batch crop-and-index pipeline, its stages, a naive loop, and faiss search latency.

    python benchmarks/index_throughput.py --n 200 --detector-weights ../shared/models/yolov8n_coco_int8.tflite
    python benchmarks/index_throughput.py --n 200 --set embedder.runtime=torch --out …   # the runtimes compared

Prints a table and writes JSON (default ``benchmarks/results/index_throughput-<device>.json``).
Images: the first N rows of ``--source`` (a CSV or folder; default the shared Stanford Cars crops),
or ``--synthetic N`` generated cars when no data is at hand (e.g. on a GPU box).
``--detector-weights yaml:yolov8n`` builds a random-weight YOLOv8n (the real architecture and cost,
meaningless boxes) for timing a PyTorch detector without downloadable weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CROPS = ROOT.parent / "shared" / "data" / "stanford_cars" / "crops.csv"


def synthetic_sources(n: int, folder: Path) -> list:
    from carsearch.data.sources import SourceItem

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CLASS_COLOURS, make_car_image  # type: ignore[import-not-found]

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        make_car_image(i, CLASS_COLOURS[i % 4], size=(640, 480)).save(path, quality=90)
        items.append(SourceItem(path=path, label=str(i % 4)))
    return items


def random_yolo(folder: Path) -> str:
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml", task="detect")
    names = {i: f"class{i}" for i in range(80)}
    names.update({2: "car", 5: "bus", 7: "truck"})
    model.model.names = names
    with torch.no_grad():
        for branch in model.model.model[-1].cv3:
            branch[-1].bias.fill_(-10.0)
            branch[-1].bias[2] = 0.0  # car score 0.5: a few boxes survive NMS, like a real photo
    path = folder / "yolov8n_random.pt"
    model.save(str(path))
    return str(path)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return self_kb / 1024


def bench_faiss(dim: int, sizes: list[int], queries: int = 100, k: int = 10) -> list[dict]:
    from carsearch.config import IndexConfig
    from carsearch.index.backend import build_index, to_search_device

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        gallery = rng.normal(size=(n, dim)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        q = gallery[rng.choice(n, queries, replace=False)] + 0.01
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        tic = time.perf_counter()
        for row in q:  # one query at a time, as the CLI/demo search does
            sims = gallery @ row
            np.argpartition(-sims, k)[:k]
        numpy_ms = (time.perf_counter() - tic) / queries * 1000
        for kind in ("flat", "ivf"):
            config = IndexConfig(kind=kind, use_gpu=torch.cuda.is_available())
            tic = time.perf_counter()
            index = to_search_device(build_index(gallery, config), config.use_gpu)
            build_s = time.perf_counter() - tic
            index.search(q[:1], k)
            tic = time.perf_counter()
            for row in q:
                index.search(row[None], k)
            single_ms = (time.perf_counter() - tic) / queries * 1000
            tic = time.perf_counter()
            _, ids = index.search(q, k)
            batch_ms = (time.perf_counter() - tic) / queries * 1000
            exact = np.argsort(-(q @ gallery.T), axis=1)[:, :k]
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact, strict=True)]))
            rows.append(
                {
                    "n": n,
                    "dim": dim,
                    "kind": type(index).__name__,
                    "build_s": round(build_s, 3),
                    "query_ms": round(single_ms, 3),
                    "batched_query_ms": round(batch_ms, 4),
                    "numpy_query_ms": round(numpy_ms, 3),
                    "recall_at_10_vs_exact": round(recall, 3),
                }
            )
    return rows


def main() -> None:
    from carsearch.cli import add_set_option

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(SHARED_CROPS))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--synthetic", type=int, default=0, help="use N generated images instead of --source")
    parser.add_argument(
        "--detector-weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n_coco_int8.tflite")
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--faiss-sizes", default="10000,100000")
    parser.add_argument("--out", help="JSON path")
    add_set_option(parser, "e.g. --set embedder.runtime=torch")
    args = parser.parse_args()

    from carsearch.data.cropping import apply_plan, plan_image
    from carsearch.data.images import load_image
    from carsearch.data.sources import read_source
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.local_engine import run_index_job

    tmp = Path(tempfile.mkdtemp(prefix="carsearch-bench-"))
    items = synthetic_sources(args.synthetic, tmp / "images") if args.synthetic else read_source(args.source)[: args.n]
    weights = random_yolo(tmp) if args.detector_weights == "yaml:yolov8n" else args.detector_weights
    overrides = [
        f"detector.weights={weights}",
        f"runtime.device={args.device}",
        f"runtime.batch_size={args.batch_size}",
        f"runtime.workers={args.workers}",
        *args.overrides,
    ]
    pipe = Pipeline.from_config(overrides=overrides)
    detector, embedder, config = pipe.detector, pipe.embedder, pipe.config
    n = len(items)
    print(
        f"{n} images from {'synthetic' if args.synthetic else args.source}; device {pipe.device}; "
        f"detector {Path(weights).name}; embedder {embedder.source} on {embedder.runtime} "
        f"({embedder.batch_size} per pass); threads {torch.get_num_threads()}",
        flush=True,
    )

    images = [load_image(item.path) for item in items]
    # warm-up (model load, first-call allocations, cuDNN autotune)
    detector.detect(images[:2])
    embedder.embed(images[:2])

    def sync() -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()

    bs = args.batch_size
    tic = time.perf_counter()
    detections = []
    for start in range(0, n, bs):
        detections.extend(detector.detect(images[start : start + bs]))
    sync()
    detect_s = time.perf_counter() - tic
    crops = [
        apply_plan(im, plan_image(config, im.width, im.height, d, single=True)[0])
        for im, d in zip(images, detections, strict=True)
    ]
    tic = time.perf_counter()
    embedder.embed(crops)
    sync()
    embed_s = time.perf_counter() - tic

    out_dir = tmp / "index"
    tic = time.perf_counter()
    report = run_index_job(pipe, items, out_dir)
    sync()
    pipeline_s = time.perf_counter() - tic

    tic = time.perf_counter()
    vectors = []
    for item in items:  # the naive loop: one image at a time, decode → detect → crop → embed
        image = load_image(item.path)
        plan = plan_image(config, image.width, image.height, detector.detect([image])[0], single=True)[0]
        vectors.append(embedder.embed([apply_plan(image, plan)])[0])
    sync()
    naive_s = time.perf_counter() - tic

    a, b = rate(n, detect_s), rate(n, embed_s)
    implied = 1.0 / (1.0 / a + 1.0 / b)
    c, d = rate(n, pipeline_s), rate(n, naive_s)
    gpu_mem = torch.cuda.max_memory_allocated() / 2**20 if pipe.device.type == "cuda" else None
    faiss_rows = bench_faiss(embedder.dim, [int(s) for s in args.faiss_sizes.split(",") if s])
    result = {
        "images": n,
        "device": str(pipe.device),
        "gpu": torch.cuda.get_device_name(0) if pipe.device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "detector": Path(weights).name,
        "embedder": embedder.source,
        "embedder_runtime": embedder.runtime,
        "embedder_batch_size": embedder.batch_size,
        "batch_size": bs,
        "workers": args.workers,
        "a_detector_img_s": round(a, 2),
        "b_embedder_img_s": round(b, 2),
        "implied_a_plus_b_img_s": round(implied, 2),
        "c_pipeline_img_s": round(c, 2),
        "d_naive_img_s": round(d, 2),
        "c_over_implied": round(c / implied, 3),
        "c_over_d": round(c / d, 3),
        "no_detection": report.no_detection,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(gpu_mem, 1) if gpu_mem is not None else None,
        "faiss": faiss_rows,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"\n{'stage':<38}{'img/s':>10}")
    for label, value in [
        ("(a) detector alone", a),
        ("(b) embedder alone", b),
        ("    implied by (a)+(b)", implied),
        ("(c) batch pipeline (decode+det+emb+save)", c),
        ("(d) naive one-at-a-time loop", d),
    ]:
        print(f"{label:<38}{value:>10.2f}")
    print(f"(c)/implied = {c / implied:.2f} (target >= 0.80); (c)/(d) = {c / d:.2f} (target >= 3)")
    print(f"peak RSS {result['peak_rss_mb']} MB" + (f", peak GPU {result['peak_gpu_mb']} MB" if gpu_mem else ""))
    print(f"\n{'faiss index':<22}{'N':>8}{'dim':>6}{'query ms':>10}{'batched ms':>12}{'numpy ms':>10}{'recall@10':>11}")
    for row in faiss_rows:
        print(
            f"{row['kind']:<22}{row['n']:>8}{row['dim']:>6}{row['query_ms']:>10.3f}{row['batched_query_ms']:>12.4f}"
            f"{row['numpy_query_ms']:>10.3f}{row['recall_at_10_vs_exact']:>11.3f}"
        )
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"index_throughput-{pipe.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
