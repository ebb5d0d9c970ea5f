"""faiss index construction and search: inner product on L2-normalised vectors, CPU or GPU.

Kinds: ``flat`` (exact), ``ivf`` (IVF-Flat), ``hnsw`` (HNSW-Flat) and ``ivfpq`` (PCA with a random rotation
to a smaller dimension, IVF, 4-bit fast-scan PQ codes; candidates re-scored exactly from the full vectors,
which stay on disk). How ``auto`` chooses and the memory per vector of each kind: docs/indexes.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import faiss
import numpy as np

from carsearch.config import IndexConfig

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
APPROXIMATE = ("ivf", "ivfpq", "hnsw")
IVFPQ_MIN_ITEMS = 10_000  # below: too few to train PCA + IVF + PQ on (and exact search is cheap)
TRAIN_PER_LIST = 64  # IVF/PQ training sample: at most max(TRAIN_MIN, 64 · nlist) vectors, drawn at random
TRAIN_MIN = 100_000
DEFAULT_NPROBE = 16  # before tuning, or with tuning off
DEFAULT_EF_SEARCH = 64


def choose_kind(config: IndexConfig, n_items: int) -> str:
    """The kind to build for ``n_items`` vectors.

    ``auto``: ``flat`` below ``ivf_threshold`` items, ``ivfpq`` from ``pq_threshold`` on, ``ivf`` between
    (none by default: both thresholds are 100k).
    An empty index, or an ``ivfpq`` of fewer than :data:`IVFPQ_MIN_ITEMS` items (too few to train PQ on), is
    ``flat``.
    """
    kind = config.kind
    if kind == "auto":
        kind = "ivfpq" if n_items >= config.pq_threshold else "ivf" if n_items >= config.ivf_threshold else "flat"
    if n_items == 0 or (kind == "ivfpq" and n_items < IVFPQ_MIN_ITEMS):
        return "flat"
    return kind


def nlist_for(n_items: int) -> int:
    """Inverted lists for ``n_items`` vectors: 4·√N, at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // 39 or 1))


def ivfpq_factory(dim: int, n_items: int, max_bytes_per_vector: int, fast_scan: bool = True) -> str:
    """faiss factory string ``PCAR{d},IVF{nlist},PQ{d}x4fs`` (L2 metric) whose RAM per vector fits the budget.

    Code bytes B: the largest power of two <= half the budget (at most 64, at most ``dim``/2): the other half
    holds the 8-byte id, the fast-scan block padding, the coarse centroids and the PCA matrix (all but the id
    shared by all vectors, so their cost per vector falls as N grows: docs/indexes.md). The first d = 2·B
    principal components, randomly rotated to balance their variance, each quantised to 4 bits (SIMD
    "fast-scan" PQ, one dimension per sub-quantizer: at 1M realistic vectors this kept more of the true
    top-10 among the candidates than 2 or 4 dimensions per sub-quantizer, docs/indexes.md). ``fast_scan``
    False (faiss-gpu has no fast-scan): ``PQ{B}np``, B sub-quantizers of 8 bits on the same d dimensions.
    L2 because PCA centres the data, which changes inner products but not distances (unit vectors rank alike).
    """
    if max_bytes_per_vector < 16:
        raise ValueError(f"index.max_bytes_per_vector must be >= 16 for ivfpq, got {max_bytes_per_vector}")
    code_bytes = min(1 << ((max_bytes_per_vector // 2).bit_length() - 1), 64, max(1, dim // 2))
    m = 2 * code_bytes if fast_scan else code_bytes
    d_out = 2 * code_bytes
    codes = f"PQ{m}x4fs" if fast_scan else f"PQ{m}np"  # np: no polysemous training (slow, unused here)
    return f"PCAR{d_out},IVF{nlist_for(n_items)},{codes}"


def train_sample(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """At most max(100k, 64·nlist) rows of ``vectors`` (N, D), drawn without replacement, in memory."""
    size = min(len(vectors), max(TRAIN_MIN, TRAIN_PER_LIST * nlist))
    if size == len(vectors):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def build_index(vectors: np.ndarray, config: IndexConfig, batch: int = 100_000) -> faiss.Index:
    """A CPU faiss index over ``vectors`` (N, D), float32, L2-normalised (a memory map is read in batches).

    Trained on :func:`train_sample`; search parameters are ``config``'s or the defaults until
    :func:`carsearch.index.tuning.tune` chooses them.
    """
    n, dim = vectors.shape
    kind = choose_kind(config, n)
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist_for(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train_sample(vectors, nlist))
    elif kind == "ivfpq":
        fast_scan = not (config.use_gpu and gpu_available())  # searched on GPU: codes faiss-gpu can hold
        factory = ivfpq_factory(dim, n, config.max_bytes_per_vector, fast_scan)
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
        index.train(train_sample(vectors, nlist_for(n)))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: auto, {', '.join(KINDS)}")
    if n and kind in APPROXIMATE:
        set_search_parameter(index, kind, configured_parameter(config, kind))
    for start in range(0, n, batch):
        index.add(np.ascontiguousarray(vectors[start : start + batch], dtype=np.float32))
    logger.debug("built faiss %s index with %d vectors of dim %d", kind, n, dim)
    return index


def parameter_name(kind: str) -> str:
    """The search parameter tuned for ``kind`` (as named in the manifest): ``nprobe`` or ``ef_search``."""
    return "ef_search" if kind == "hnsw" else "nprobe"


def configured_parameter(config: IndexConfig, kind: str) -> int:
    """``config``'s fixed nprobe / efSearch for ``kind``, else the default used before tuning."""
    if kind == "hnsw":
        return config.ef_search or DEFAULT_EF_SEARCH
    return config.nprobe or DEFAULT_NPROBE


def set_search_parameter(index: faiss.Index, kind: str, value: int) -> int:
    """Set nprobe (IVF kinds, capped at nlist) or efSearch (HNSW) on a CPU index; the value set."""
    if kind == "hnsw":
        cast(faiss.IndexHNSW, faiss.downcast_index(index)).hnsw.efSearch = int(value)  # stub: returns Index
        return int(value)
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = int(min(value, ivf.nlist))
    return int(ivf.nprobe)


def search(
    index: faiss.Index, queries: np.ndarray, k: int, vectors: np.ndarray | None = None, rescore: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids), each (Q, k), of ``queries`` (Q, D) float32, L2-normalised; -1 pads missing hits.

    Scores are inner products (cosines). With ``rescore`` > 0, the top ``k·rescore`` candidates of ``index``
    are re-scored exactly against ``vectors`` (N, D), which may be a memory map (only those rows are read).
    """
    if not rescore or vectors is None:
        scores, ids = index.search(queries, k)
        return (1.0 - scores / 2.0 if index.metric_type == faiss.METRIC_L2 else scores), ids  # |q-x|² = 2 - 2q·x
    depth = min(k * rescore, index.ntotal)
    _, ids = index.search(queries, depth)
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    for row, (query, cands) in enumerate(zip(queries, ids, strict=True)):
        valid = np.flatnonzero(cands >= 0)
        rows = np.sort(cands[valid])  # sorted rows: sequential reads from a memory map
        # einsum, not BLAS: a threaded gemv waking its threads next to faiss's OpenMP ones slows every query
        exact = np.einsum("nd,d->n", np.asarray(vectors[rows], dtype=np.float32), query)
        scores[row, valid] = exact[np.searchsorted(rows, cands[valid])]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    return top_scores, np.where(np.isfinite(top_scores), top_ids, -1)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: list[Any] = []


def to_search_device(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """The index sharded over all visible GPUs when asked and possible (HNSW stays on CPU)."""
    if not use_gpu or not gpu_available() or isinstance(index, faiss.IndexHNSWFlat):
        return index
    try:
        if not _GPU_RESOURCES:  # one set of resources per GPU and process, kept alive for every index
            _GPU_RESOURCES.extend(faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus()))
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # each GPU holds 1/n of the vectors; results are merged
        return faiss.index_cpu_to_gpu_multiple_py(_GPU_RESOURCES, index, options)
    except Exception as exc:  # noqa: BLE001 - GPU is an optimisation; CPU search still works
        logger.warning("faiss GPU transfer failed (%s); searching on CPU", exc)
        return index


def serialize(index: faiss.Index) -> bytes:
    """Bytes of a (CPU) index, for atomic writes."""
    return faiss.serialize_index(index).tobytes()
