"""Search post-processing (flip TTA, AQE/αQE, DBA, k-reciprocal) measured; and torch vs onnxruntime speed.

    carsearch export runs/cpu_quick/proxyanchor_e10 --out proxyanchor_e10.pt   # a run: docs/reranking.md
    python benchmarks/rerank.py --model proxyanchor_e10.pt --work runs/rerank \\
        --detector-weights ../shared/models/yolov8n_coco_int8.tflite

Protocol. Classes are the sorted labels of the shared Stanford Cars crops: the first 49 are **tuning**
classes (the trained model's training classes too), the last 49 are **test** classes. Every setting
(k of AQE/DBA, alpha, k1/k2/lambda) is chosen on the tuning classes with zero-shot crop embeddings
(highest MAP@R whose R@1 is not below plain search), then reported once on the test classes for
each gallery: the crops with the zero-shot and the trained embedder, and the photos of the test
classes (``box_fully_visible == 1``) raw and cropped by the detector. Metrics are leave-one-out over
the gallery (each query's own item is never a candidate, also not for re-ranking).

Latency: per-query time of each option (one query at a time, k = 10), minus plain search, on galleries
of 1k / 10k / 100k vectors resampled from the trained crop embeddings (class means plus real residuals),
flat index; DBA's one-off cost (at index load) separately. Embedder speed: img/s of torch eager vs
onnxruntime on the same crops and batch sizes. Galleries are indexes under ``--work`` (re-runs resume).
Writes ``benchmarks/results/rerank-<device>.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "stanford_cars"

from carsearch.config import RetrievalConfig  # noqa: E402
from carsearch.index import GalleryIndex  # noqa: E402
from carsearch.pipeline import Pipeline, evaluate_index  # noqa: E402
from carsearch.runtime.threads import configure_threads  # noqa: E402


def subset(gallery: GalleryIndex, labels: set[str]) -> GalleryIndex:
    keep = [i for i, r in enumerate(gallery.records) if r.label in labels]
    out = GalleryIndex(gallery.dim, gallery.manifest, gallery.config)
    out.add(gallery.vectors[keep], [gallery.records[i] for i in keep])
    return out


def metrics_of(gallery: GalleryIndex, config: RetrievalConfig) -> dict[str, float]:
    tic = time.perf_counter()
    m = evaluate_index(gallery, config).metrics
    return {
        "recall_at_1": m.recall_at[1],
        "recall_at_4": m.recall_at[4],
        "map_at_r": m.map_at_r,
        "queries": m.num_queries,
        "eval_s": time.perf_counter() - tic,
    }


def build(work: Path, name: str, source: Path, overrides: list[str]) -> GalleryIndex:
    """An index of ``source`` under ``work/name`` (resumes), loaded."""
    out = work / name
    pipeline = Pipeline.from_config(None, ["index.use_gpu=false", *overrides])
    report = pipeline.index(source, out, progress=True)
    print(f"  {name}: {report.items_in_index} items ({report.errors} errors, {report.seconds:.0f} s)", flush=True)
    return GalleryIndex.load(out, pipeline.config.index)


def tune(gallery: GalleryIndex) -> tuple[dict[str, RetrievalConfig], list[dict]]:
    """Per method, the setting with the best MAP@R whose R@1 is not below plain search (tuning classes);
    when none keeps R@1, the one that loses least R@1 (ties: higher MAP@R)."""
    plain = metrics_of(gallery, RetrievalConfig())
    grid = {
        "aqe": [RetrievalConfig(qe_k=k, qe_alpha=a) for k, a in itertools.product((1, 2, 3, 5), (0.0, 3.0))],
        "dba": [RetrievalConfig(dba_k=k, dba_alpha=a) for k, a in itertools.product((1, 2, 3, 5), (0.0, 3.0))],
        "kreciprocal": [
            RetrievalConfig(kreciprocal=True, k1=k1, k2=k2, lambda_value=lam)
            for k1, k2, lam in itertools.product((10, 20), (3, 6), (0.1, 0.3, 0.6, 0.8))
        ],
    }
    chosen, rows = {}, [{"method": "plain", **plain}]
    for method, configs in grid.items():
        measured = []
        for config in configs:
            m = metrics_of(gallery, config)
            rows.append({"method": method, "config": _short(config), **m})
            measured.append((config, m))
        keep = [(c, m) for c, m in measured if m["recall_at_1"] >= plain["recall_at_1"]]
        if keep:
            chosen[method] = max(keep, key=lambda cm: cm[1]["map_at_r"])[0]
        else:
            chosen[method] = max(measured, key=lambda cm: (cm[1]["recall_at_1"], cm[1]["map_at_r"]))[0]
        print(f"  tuned {method}: {_short(chosen[method])}", flush=True)
    return chosen, rows


def _short(config: RetrievalConfig) -> str:
    return config.describe() or "plain"


def combinations(chosen: dict[str, RetrievalConfig]) -> dict[str, RetrievalConfig]:
    aqe, dba, krec = chosen["aqe"], chosen["dba"], chosen["kreciprocal"]
    both = {"qe_k": aqe.qe_k, "qe_alpha": aqe.qe_alpha, "dba_k": dba.dba_k, "dba_alpha": dba.dba_alpha}
    rerank = {"kreciprocal": True, "k1": krec.k1, "k2": krec.k2, "lambda_value": krec.lambda_value}
    return {
        "plain": RetrievalConfig(),
        "aqe": aqe,
        "dba": dba,
        "kreciprocal": krec,
        "dba+aqe": RetrievalConfig(**both),
        "aqe+kreciprocal": replace(krec, qe_k=aqe.qe_k, qe_alpha=aqe.qe_alpha),
        "dba+kreciprocal": replace(krec, dba_k=dba.dba_k, dba_alpha=dba.dba_alpha),
        "dba+aqe+kreciprocal": RetrievalConfig(**both, **rerank),
    }


def synthetic_gallery(vectors: np.ndarray, labels: list[str], n: int, seed: int = 0) -> GalleryIndex:
    """``n`` vectors shaped like real ones: a class mean (98 real ones, perturbed into n/40 classes) plus
    a real item's residual from its own class mean."""
    from carsearch.index import ItemRecord
    from carsearch.index.rerank import normalise

    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    index = {name: [i for i, label in enumerate(labels) if label == name] for name in names}
    means = np.stack([vectors[index[name]].mean(0) for name in names])
    residuals = vectors - means[[names.index(label) for label in labels]]
    classes = max(1, n // 40)
    spread = np.linalg.norm(residuals, axis=1).mean() / np.sqrt(vectors.shape[1])
    centres = means[rng.integers(len(means), size=classes)] + rng.normal(scale=spread, size=(classes, vectors.shape[1]))
    cls = rng.integers(classes, size=n)
    out = normalise(centres[cls] + residuals[rng.integers(len(residuals), size=n)])
    gallery = GalleryIndex(vectors.shape[1], {})
    gallery.add(out, [ItemRecord(path=str(i), label=str(c), content_hash=str(i)) for i, c in enumerate(cls)])
    return gallery


def latency(
    vectors: np.ndarray, labels: list[str], sizes: list[int], configs: dict[str, RetrievalConfig]
) -> list[dict]:
    rows = []
    for n in sizes:
        gallery = synthetic_gallery(vectors, labels, n)
        queries = gallery.vectors[np.random.default_rng(1).integers(n, size=50)]
        row: dict[str, float] = {"items": n}
        for name, config in configs.items():
            if config.dba_k:
                tic = time.perf_counter()
                gallery.augmented(config.dba_k, config.dba_alpha)
                row[f"{name}_build_s"] = time.perf_counter() - tic
            gallery.retrieve(queries[:1], 10, config)  # warm
            tic = time.perf_counter()
            for q in queries:
                gallery.retrieve(q[None], 10, config)
            row[f"{name}_ms"] = (time.perf_counter() - tic) / len(queries) * 1000
        rows.append(row)
        print("  latency", {k: round(v, 2) for k, v in row.items()}, flush=True)
    return rows


def embedder_speed(model: str | None, paths: list[Path], batch_sizes: list[int]) -> list[dict]:
    from PIL import Image

    from carsearch.config import EmbedderConfig
    from carsearch.embedder import Embedder

    images = [Image.open(p).convert("RGB") for p in paths]
    rows = []
    torch_embedder = Embedder.from_config(EmbedderConfig(model=model or "imagenet", runtime="torch"))
    onnx_embedder = Embedder(torch_embedder.model, runtime="onnx", source=torch_embedder.source)
    tensors = torch_embedder.tensors(images)
    for batch in batch_sizes:
        row: dict[str, float] = {"batch": batch}
        for name, embedder in (("torch", torch_embedder), ("onnxruntime", onnx_embedder)):
            embedder.batch_size = batch
            embedder.embed_tensors(tensors[:batch])  # warm
            tic = time.perf_counter()
            out = embedder.embed_tensors(tensors)
            row[f"{name}_img_s"] = len(images) / (time.perf_counter() - tic)
            row[f"{name}_vectors"] = out
        row["max_abs_diff"] = float(np.abs(row.pop("torch_vectors") - row.pop("onnxruntime_vectors")).max())
        row["speedup"] = row["onnxruntime_img_s"] / row["torch_img_s"]
        rows.append(row)
        print("  embedder", {k: round(v, 4) for k, v in row.items()}, flush=True)
    return rows


def write_csv(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", help="trained embedder checkpoint (carsearch export) trained on the first 49 classes"
    )
    parser.add_argument("--detector-weights", default=str(ROOT.parent / "shared/models/yolov8n_coco_int8.tflite"))
    parser.add_argument("--work", default="/tmp/carsearch-rerank", help="folder for the galleries' indexes")
    parser.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes for the latency table")
    parser.add_argument("--limit", type=int, help="first N rows of each CSV only (a quick trial)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rerank-cpu.json"))
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    work = Path(args.work)
    crops_csv, photos_csv = SHARED / "crops.csv", SHARED / "photos.csv"
    with crops_csv.open() as handle:
        crop_rows = list(csv.DictReader(handle))[: args.limit]
    names = sorted({r["label"] for r in crop_rows})
    tune_classes, test_classes = set(names[: len(names) // 2]), set(names[len(names) // 2 :])
    with photos_csv.open() as handle:
        photo_rows = [
            {
                "path": str((photos_csv.parent / r["path"]).resolve()),
                **{k: r[k] for k in ("label", "x1", "y1", "x2", "y2")},
            }
            for r in csv.DictReader(handle)
            if r["box_fully_visible"] == "1" and r["label"] in test_classes
        ][: args.limit]
    photos_test = write_csv(photo_rows, work / "photos_test.csv")
    crops = write_csv(
        [{"path": str((crops_csv.parent / r["path"]).resolve()), "label": r["label"]} for r in crop_rows],
        work / "crops.csv",
    )

    trained = [f"embedder.model={Path(args.model).resolve()}"] if args.model else None
    models = {"zero-shot": ["embedder.model=imagenet"], "trained": trained}
    galleries: dict[str, GalleryIndex] = {}
    print("== galleries", flush=True)
    for model, extra in models.items():
        if extra is None:
            continue
        for flip in (False, True):
            tag = f"{model}{'-flip' if flip else ''}"
            flip_set = ["embedder.flip=true"] if flip else []
            galleries[f"crops/{tag}"] = build(work, f"crops-{tag}", crops, ["crop=false", *extra, *flip_set])
            if model == "zero-shot" and flip:
                continue  # photos: the zero-shot model without flip, the trained one with and without
            det = [f"detector.weights={args.detector_weights}"]
            galleries[f"photos-raw/{tag}"] = build(
                work, f"photos-raw-{tag}", photos_test, ["crop=false", *extra, *flip_set]
            )
            galleries[f"photos-crop/{tag}"] = build(work, f"photos-crop-{tag}", photos_test, [*det, *extra, *flip_set])
    if args.limit:  # a trial: galleries restricted to the CSV's first rows
        galleries = {k: v for k, v in galleries.items() if len(v) > 1}

    print("== tuning on the first 49 classes (zero-shot crops)", flush=True)
    chosen, tuning_rows = tune(subset(galleries["crops/zero-shot"], tune_classes))
    configs = combinations(chosen)

    print("== test classes", flush=True)
    results = []
    for name, gallery in galleries.items():
        test = subset(gallery, test_classes)
        for method, config in configs.items():
            m = metrics_of(test, config)
            results.append({"gallery": name, "method": method, "setting": _short(config), **m})
            print(f"  {name:24s} {method:22s} R@1 {m['recall_at_1']:.4f} R@4 {m['recall_at_4']:.4f} "
                  f"MAP@R {m['map_at_r']:.4f}", flush=True)  # fmt: skip

    print("== latency", flush=True)
    key = "crops/trained" if "crops/trained" in galleries else "crops/zero-shot"
    vectors, labels = galleries[key].vectors, [r.label for r in galleries[key].records]
    timed = {k: configs[k] for k in ("plain", "aqe", "dba", "kreciprocal", "aqe+kreciprocal")}
    latency_rows = latency(vectors, labels, [int(s) for s in args.sizes.split(",")], timed)

    print("== embedder: torch vs onnxruntime", flush=True)
    paths = [crops_csv.parent / r["path"] for r in crop_rows[:128]]
    speed_rows = embedder_speed(args.model, paths, [1, 4, 16, 32])

    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads},
        "protocol": {"tune_classes": sorted(tune_classes), "test_classes": sorted(test_classes)},
        "chosen": {k: _short(v) for k, v in chosen.items()},
        "tuning": tuning_rows,
        "test": results,
        "latency": latency_rows,
        "embedder_speed": speed_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"written: {out}")


def print_tables(result: dict) -> None:
    galleries = list(dict.fromkeys(r["gallery"] for r in result["test"]))
    methods = list(dict.fromkeys(r["method"] for r in result["test"]))
    by = {(r["gallery"], r["method"]): r for r in result["test"]}
    print("\n| method (setting chosen on the tuning classes) | " + " | ".join(galleries) + " |")
    print("|---|" + "---|" * len(galleries))
    for method in methods:
        cells = []
        for g in galleries:
            r = by[(g, method)]
            cells.append(f"{100 * r['recall_at_1']:.1f} / {100 * r['recall_at_4']:.1f} / {100 * r['map_at_r']:.2f}")
        setting = by[(galleries[0], method)]["setting"]
        print(f"| {method} ({setting}) | " + " | ".join(cells) + " |")
    print("\n| items | " + " | ".join(k for k in result["latency"][0] if k != "items") + " |")
    print("|---|" + "---|" * (len(result["latency"][0]) - 1))
    for row in result["latency"]:
        print(f"| {row['items']} | " + " | ".join(f"{v:.2f}" for k, v in row.items() if k != "items") + " |")
    print("\n| batch | torch img/s | onnxruntime img/s | speed-up | max abs diff |\n|---|---|---|---|---|")
    for row in result["embedder_speed"]:
        print(
            f"| {row['batch']} | {row['torch_img_s']:.1f} | {row['onnxruntime_img_s']:.1f} | {row['speedup']:.2f}× | "
            f"{row['max_abs_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
