"""Index kinds at 100k and 1M realistic vectors: build time, RAM per vector, recall vs exact, latency.

Realistic, not uniform noise: the vectors are drawn from the statistics of real embeddings of the shared
Stanford Cars crops (98 classes, the project's pretrained embedder). Each of ``--classes`` synthetic classes
is a real class centre moved by a Gaussian draw from the covariance of the real class centres (scaled by
``--centre-scale``); each item is its class centre plus a Gaussian draw from the real within-class
covariance (top 512 principal components, the rest of the variance isotropic), scaled by its real parent
class's spread; then L2-normalised. Queries are held-out items of the same classes.

    # the real embeddings, once (about 1 min on 2 cores):
    carsearch index ../shared/data/stanford_cars/crops.csv --out /tmp/crops_index --raw --model imagenet
    python benchmarks/scale_indexes.py --real /tmp/crops_index --sizes 100000 1000000

Writes ``benchmarks/results/scale-indexes-cpu.json``; part (c), the 10M / 100M estimate, is in docs/indexes.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from carsearch.config import IndexConfig
from carsearch.index import backend, tuning

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "scale-indexes-cpu.json"
COMPONENTS = 512  # within-class principal components drawn exactly; the remaining variance is isotropic


@dataclass(frozen=True)
class RealStatistics:
    """What the generator keeps of the real embeddings (D = embedding dimension, C = real classes)."""

    centres: np.ndarray  # (C, D) class means
    centre_basis: np.ndarray  # (C-1, D) principal directions of the centres, scaled by their std
    within_basis: np.ndarray  # (COMPONENTS, D) principal directions of within-class residuals, scaled
    within_rest: float  # std per dimension of the residual variance outside within_basis
    spreads: np.ndarray  # (C,) each class's residual RMS relative to the mean


def real_statistics(vectors: np.ndarray, labels: np.ndarray) -> RealStatistics:
    """Class centres, their covariance, and the within-class covariance of real embeddings (N, D)."""
    classes = np.unique(labels)
    centres = np.stack([vectors[labels == c].mean(0) for c in classes])
    residuals = np.concatenate([vectors[labels == c] - centres[i] for i, c in enumerate(classes)])
    rms = np.array([np.sqrt(((vectors[labels == c] - centres[i]) ** 2).sum(1).mean()) for i, c in enumerate(classes)])

    def basis(x: np.ndarray, keep: int) -> tuple[np.ndarray, float]:
        _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        std = s / np.sqrt(len(x) - 1)
        rest = float(np.sqrt((std[keep:] ** 2).sum() / x.shape[1]))
        return (std[:keep, None] * vt[:keep]).astype(np.float32), rest

    centre_basis, _ = basis(centres, len(classes) - 1)
    within_basis, within_rest = basis(residuals, COMPONENTS)
    return RealStatistics(centres.astype(np.float32), centre_basis, within_basis, within_rest, rms / rms.mean())


def synthesize(
    stats: RealStatistics,
    n: int,
    classes: int,
    centre_scale: float,
    seed: int,
    out: np.ndarray | None = None,
    batch: int = 50_000,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised vectors (n, D) float32 of ``classes`` synthetic classes, and their class ids (n,).

    ``out``: an (n, D) array to fill (e.g. a memory-mapped .npy), batch by batch.
    """
    rng = np.random.default_rng(seed)
    parents = rng.integers(len(stats.centres), size=classes)
    z = rng.standard_normal((classes, len(stats.centre_basis)), dtype=np.float32)
    centres = stats.centres[parents] + centre_scale * (z @ stats.centre_basis)
    labels = rng.integers(classes, size=n)
    out = np.empty((n, stats.centres.shape[1]), dtype=np.float32) if out is None else out
    for start in range(0, n, batch):
        ids = labels[start : start + batch]
        z = rng.standard_normal((len(ids), len(stats.within_basis)), dtype=np.float32)
        noise = z @ stats.within_basis
        noise += stats.within_rest * rng.standard_normal(noise.shape, dtype=np.float32)
        x = centres[ids] + stats.spreads[parents[ids], None].astype(np.float32) * noise
        out[start : start + batch] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels


def describe(vectors: np.ndarray) -> dict[str, float]:
    """Realism checks: dimensions holding 95% of the variance, mean / p10 cosine to the nearest other item."""
    centred = vectors - vectors.mean(0)
    var = np.linalg.svd(centred, compute_uv=False) ** 2
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(1)
    return {
        "dims_95pct_variance": int(np.searchsorted(np.cumsum(var) / var.sum(), 0.95) + 1),
        "mean_nn_cosine": round(float(nearest.mean()), 3),
        "p10_nn_cosine": round(float(np.percentile(nearest, 10)), 3),
        "mean_cosine": round(float(sims[sims > -1].mean()), 3),
    }


def realistic_gallery(
    stats: RealStatistics, n: int, queries: int, classes: int, centre_scale: float, path: Path, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) gallery, memory-mapped from the .npy at ``path``, and (queries, D) held-out queries, same classes."""
    dim = stats.centres.shape[1]
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n + queries, dim))
    synthesize(stats, n + queries, classes, centre_scale, seed, out=mapped)
    mapped.flush()
    del mapped
    return np.load(path, mmap_mode="r")[:n], np.array(np.load(path, mmap_mode="r")[n:])


def top10(index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, rescore: int, batch: int) -> np.ndarray:
    """(Q, 10) ids of ``queries`` (Q, D), searched ``batch`` at a time."""
    parts = [
        backend.search(index, queries[i : i + batch], 10, vectors, rescore)[1] for i in range(0, len(queries), batch)
    ]
    return np.concatenate(parts)


def latencies(
    index: faiss.Index, queries: np.ndarray, vectors: np.ndarray, rescore: int, batch: int, singles: int, threads: int
) -> dict[str, float]:
    """p50 / p99 ms of ``singles`` single queries (k 10) with 1 and with ``threads`` faiss threads, and the
    median per-query ms of batches of ``batch`` queries with ``threads`` threads."""
    out: dict[str, float] = {}
    for count in sorted({1, threads}):
        faiss.omp_set_num_threads(count)
        single = []
        for query in queries[:singles]:
            start = time.perf_counter()
            backend.search(index, query[None], 10, vectors, rescore)
            single.append(time.perf_counter() - start)
        out[f"single_p50_ms_{count}t"] = round(1000 * float(np.percentile(single, 50)), 3)
        out[f"single_p99_ms_{count}t"] = round(1000 * float(np.percentile(single, 99)), 3)
    faiss.omp_set_num_threads(threads)
    batched = []
    for first in range(0, len(queries) - batch + 1, batch):
        start = time.perf_counter()
        backend.search(index, queries[first : first + batch], 10, vectors, rescore)
        batched.append((time.perf_counter() - start) / batch)
    out["batched_ms_per_query"] = round(1000 * float(np.median(batched)), 3)
    return out


def measure(
    kind: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, singles: int, batch: int, threads: int
) -> dict[str, Any]:
    """One result row: build (train + add) and tuning time, RAM per vector, recall@1/@10 vs exact, latency."""
    n = len(gallery)
    config = IndexConfig(kind=kind, use_gpu=False)  # type: ignore[arg-type]
    start = time.perf_counter()
    index = backend.build_index(gallery, config)
    built = time.perf_counter()
    info = tuning.tune(index, gallery, kind, config)
    tuned = time.perf_counter()
    rescore = config.rescore if kind == "ivfpq" else 0
    ids = top10(index, queries, gallery, rescore, batch)
    faiss_bytes = int(faiss.serialize_index(index).size)  # codes, ids, centroids, graph
    row = {
        "n": n,
        "kind": kind,
        "factory": backend.ivfpq_factory(gallery.shape[1], n, config.max_bytes_per_vector) if kind == "ivfpq" else None,
        "build_s": round(built - start, 1),
        "tune_s": round(tuned - built, 1),
        "ram_bytes_per_vector": round(faiss_bytes / n, 1),
        "disk_vectors_bytes_per_vector": gallery.shape[1] * 4 if kind == "ivfpq" else 0,
        "parameter": {k: info[k] for k in ("nprobe", "ef_search") if k in info},
        "tuned_recall_at_10": info["recall_at_10"],
        "recall_at_1": round(tuning.recall_at(ids[:, :1], truth[:, :1]), 4),
        "recall_at_10": round(tuning.recall_at(ids, truth), 4),
        **latencies(index, queries, gallery, rescore, batch, singles, threads),
        "sweep": sweep(index, kind, info, queries, truth, gallery, rescore, batch) if kind != "flat" else [],
    }
    logger.info("%s", row)
    return row


def sweep(
    index: faiss.Index,
    kind: str,
    info: dict[str, Any],
    queries: np.ndarray,
    truth: np.ndarray,
    vectors: np.ndarray,
    rescore: int,
    batch: int,
) -> list[dict[str, Any]]:
    """Held-out recall@10 and batched ms/query around the tuned parameter (¼×, ½×, 1×, 2×); tuned value restored."""
    name = backend.parameter_name(kind)
    tuned = info[name]
    rows = []
    for value in sorted({max(1, tuned // 4), max(1, tuned // 2), tuned, 2 * tuned}):
        value = backend.set_search_parameter(index, kind, value)
        start = time.perf_counter()
        ids = top10(index, queries, vectors, rescore, batch)
        ms = round(1000 * (time.perf_counter() - start) / len(queries), 3)
        rows.append({name: value, "recall_at_10": round(tuning.recall_at(ids, truth), 4), "batched_ms_per_query": ms})
    backend.set_search_parameter(index, kind, tuned)
    return rows


def records_bytes_per_item(n: int = 10_000) -> float:
    """Python RAM per :class:`ItemRecord` like the ones an index holds (path, label, hash, box, size)."""
    import tracemalloc

    from carsearch.index.records import ItemRecord

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    records = [
        ItemRecord(f"/data/cars/{i:08d}.jpg", f"Make Model {i % 5000} 2012", f"{i:064x}", [1.0, 2.0, 300.0, 200.0],
                   0.9, "car", [], [640, 480])
        for i in range(n)
    ]  # fmt: skip
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del records
    return round(used / n, 1)


def load_real(real: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (N, D) and labels (N,) of a saved carsearch index."""
    from carsearch.index.gallery import read_records
    from carsearch.index.manifest import read_manifest

    labels = read_records(real, read_manifest(real)).column("label")  # items.arrow, or a version-1 items.jsonl
    return np.load(real / "vectors.npy"), np.array(labels)


def run(
    stats: RealStatistics,
    sizes: list[int],
    kinds: list[str],
    work: Path,
    queries: int = 1_000,
    classes: int = 10_000,
    centre_scale: float = 0.5,
    batch: int = 256,
    max_items: dict[str, int] | None = None,
    flat_timed_queries: int = 100,
    threads: int = 2,
) -> list[dict[str, Any]]:
    """Result rows for every size and kind (a kind is skipped above ``max_items[kind]``), plus auto's choice.

    The gallery is written to ``work`` and memory-mapped, as an opened index's vectors are; deleted after.
    """
    max_items = max_items or {}
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        start = time.perf_counter()
        gallery, held_out = realistic_gallery(stats, n, queries, classes, centre_scale, work / f"gallery-{n}.npy")
        made = time.perf_counter()
        truth = tuning.exact_knn(held_out, gallery, 10)[1]
        logger.info("n %d: generated in %.0f s, exact top-10 in %.0f s", n, made - start, time.perf_counter() - made)
        for kind in kinds:
            if n > max_items.get(kind, n):
                logger.info("n %d: %s skipped (above --max-items)", n, kind)
                continue
            singles = flat_timed_queries if kind == "flat" else queries
            rows.append(measure(kind, gallery, held_out, truth, singles, batch, threads))
        chosen = backend.choose_kind(IndexConfig(), n)
        rows.append({"n": n, "kind": "auto", "chooses": chosen, **targets(rows, n, chosen)})
        del gallery
        (work / f"gallery-{n}.npy").unlink()
    return rows


def targets(rows: list[dict[str, Any]], n: int, kind: str) -> dict[str, Any]:
    """The issue's targets for auto's choice at ``n``: recall@10 >= 0.95, <= 64 B/vector, single p50 <= 5 ms."""
    measured = [r for r in rows if r["n"] == n and r["kind"] == kind]
    if not measured:
        return {}
    r = measured[0]
    return {
        "recall_at_10_ge_0.95": r["recall_at_10"] >= 0.95,
        "ram_le_64_bytes_per_vector": r["ram_bytes_per_vector"] <= 64,
        "single_p50_le_5_ms": max(r["single_p50_ms_1t"], r.get("single_p50_ms_2t", 0.0)) <= 5.0,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (latency: single-query p50 / p99 ms with 1 and 2 faiss threads)."""
    head = (
        "| N | kind | build s | tune s | RAM B/vector | nprobe / efSearch | R@1 | R@10 "
        "| 1 thread p50 / p99 ms | 2 threads p50 / p99 ms | batch of 256, ms/query |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["kind"] == "auto":
            lines.append(f"| {r['n']:,} | auto → {r['chooses']} |" + " |" * 9)
            continue
        param = ", ".join(f"{k} {v}" for k, v in r["parameter"].items()) or "–"
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['build_s']} | {r['tune_s']} | {r['ram_bytes_per_vector']:,} | {param} "
            f"| {r['recall_at_1']:.3f} | {r['recall_at_10']:.3f} | {r['single_p50_ms_1t']} / {r['single_p99_ms_1t']} "
            f"| {r.get('single_p50_ms_2t', '–')} / {r.get('single_p99_ms_2t', '–')} | {r['batched_ms_per_query']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="carsearch index of the shared crops (--raw)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw", "ivfpq"])
    skip = "KIND=N: skip KIND above N items (default: HNSW only at 100k; at 1M it holds 5.4 GB and builds slowly)"
    parser.add_argument("--max-items", nargs="*", default=["hnsw=100000"], help=skip)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--centre-scale", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/carsearch-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    faiss.omp_set_num_threads(args.threads)
    max_items = {k: int(v) for k, v in (item.split("=") for item in args.max_items)}
    started = time.perf_counter()
    vectors, labels = load_real(args.real)
    stats = real_statistics(vectors, labels)
    rows = run(stats, args.sizes, args.kinds, args.work, args.queries, args.classes, args.centre_scale,
               max_items=max_items, threads=args.threads)  # fmt: skip
    result = {
        "command": "python benchmarks/scale_indexes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__},
        "threads": args.threads,
        "realism": {
            "real": describe(vectors),
            "synthetic_same_size": describe(synthesize(stats, len(vectors), args.classes, args.centre_scale, 2)[0]),
        },
        "records_bytes_per_item": records_bytes_per_item(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(json.dumps({k: result[k] for k in ("realism", "records_bytes_per_item", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
