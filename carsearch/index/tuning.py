"""Choosing an approximate index's search parameter (nprobe / efSearch) for a target recall.

The queries are a held-out sample of the gallery's own vectors: each is searched with its own item
excluded, against exact top-10 neighbours from brute force, so the measured recall is that of a new
photo of an indexed car, not the trivial "finds itself".
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from carsearch.config import IndexConfig
from carsearch.index import backend

logger = logging.getLogger(__name__)

K = 10
SAMPLE = 1_000  # tuning queries, fewer when the gallery is smaller
EXACT_BATCH = 100_000  # gallery rows per brute-force block (a memory map is read block by block)


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product (scores, ids), each (Q, k), of ``queries`` (Q, D) over ``vectors`` (N, D)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(vectors))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), EXACT_BATCH):
        block = np.ascontiguousarray(vectors[start : start + EXACT_BATCH], dtype=np.float32)
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_scores, best_ids


def drop_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ``ids`` (Q, k+1) without each row's own id ``own[q]`` (the last column when it is absent)."""
    keep = ids != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (Q, k) that is in the same row of ``found`` (Q, k')."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size) if truth.size else 1.0


def candidates(kind: str, index: faiss.Index) -> list[int]:
    """Increasing parameter values to try: nprobe 1, 2, 4, … nlist; efSearch 16, 32, … 4096."""
    if kind == "hnsw":
        return [16 << i for i in range(9)]
    nlist = faiss.extract_index_ivf(index).nlist
    values = [1 << i for i in range(nlist.bit_length()) if 1 << i < nlist]
    return [*values, nlist]


def tune(
    index: faiss.Index, vectors: np.ndarray, kind: str, config: IndexConfig, sample: int = SAMPLE, seed: int = 0
) -> dict[str, Any]:
    """Set ``index``'s search parameter and return what the manifest stores about it.

    Flat: exact, nothing measured. Otherwise the parameter is ``config``'s when fixed, else the smallest
    candidate whose recall@10 reaches ``config.target_recall`` (the largest tried when none does, with a
    warning); its recall is measured on ``sample`` held-out gallery vectors either way. ``target_recall``
    0 and no fixed value: the default parameter, recall still measured.
    """
    n = index.ntotal
    info: dict[str, Any] = {"kind": kind, "target_recall": config.target_recall}
    if kind not in backend.APPROXIMATE or n < 2:
        return {**info, "recall_at_10": 1.0, "exact": True}
    name = backend.parameter_name(kind)
    rescore = config.rescore if kind == "ivfpq" else 0
    k = min(K, n - 1)
    rng = np.random.default_rng(seed)
    own = np.sort(rng.choice(n, min(sample, n), replace=False))
    queries = np.ascontiguousarray(vectors[own], dtype=np.float32)
    truth = drop_self(exact_knn(queries, vectors, k + 1)[1], own, k)

    def measure(value: int) -> tuple[int, float]:
        value = backend.set_search_parameter(index, kind, value)
        found = backend.search(index, queries, k + 1, vectors, rescore)[1]
        return value, recall_at(drop_self(found, own, k), truth)

    fixed = config.ef_search if kind == "hnsw" else config.nprobe
    if fixed is not None or config.target_recall <= 0:
        value, recall = measure(fixed or backend.configured_parameter(config, kind))
    else:
        for value in candidates(kind, index):
            value, recall = measure(value)
            if recall >= config.target_recall:
                break
        else:
            logger.warning(
                "%s index: recall@%d %.3f < target %.2f even at %s %d; raise index.max_bytes_per_vector or "
                "index.rescore, or use kind ivf/flat",
                kind, k, recall, config.target_recall, name, value,
            )  # fmt: skip
    logger.info("%s index: %s %d gives recall@%d %.3f on %d held-out vectors", kind, name, value, k, recall, len(own))
    return {**info, name: value, "recall_at_10": round(recall, 4), "sample": len(own), "rescore": rescore}


def apply(index: faiss.Index, stored: dict[str, Any], config: IndexConfig) -> None:
    """Reapply a stored (manifest) search parameter to a loaded index; ``config``'s fixed value wins."""
    kind = stored.get("kind")
    if kind not in backend.APPROXIMATE:
        return
    name = backend.parameter_name(kind)
    fixed = config.ef_search if kind == "hnsw" else config.nprobe
    value = fixed if fixed is not None else stored.get(name)
    if value is not None:
        backend.set_search_parameter(index, kind, int(value))
