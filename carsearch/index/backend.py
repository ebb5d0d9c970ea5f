"""faiss index construction: inner product on L2-normalised vectors, flat / IVF / HNSW, CPU or GPU."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from carsearch.config import IndexConfig

logger = logging.getLogger(__name__)


def choose_kind(config: IndexConfig, n_items: int) -> str:
    """Resolve ``auto``: exact flat search below ``ivf_threshold`` items, IVF above."""
    if config.kind != "auto":
        return config.kind
    return "ivf" if n_items >= config.ivf_threshold else "flat"


def build_index(vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    """A CPU faiss index over ``vectors`` (N, D), float32, L2-normalised; trained if needed."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    kind = choose_kind(config, n)
    if kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(config.nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, config.nprobe * 4)
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: auto, flat, ivf, hnsw")
    if n:
        index.add(vectors)
    logger.debug("built faiss %s index with %d vectors of dim %d", kind, n, dim)
    return index


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def to_search_device(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """Move a flat/IVF index to GPU 0 when asked and possible (HNSW stays on CPU)."""
    if not use_gpu or not gpu_available() or isinstance(index, faiss.IndexHNSWFlat):
        return index
    global _GPU_RESOURCES
    try:
        if _GPU_RESOURCES is None:  # one set of GPU resources per process, kept alive for every index
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except Exception as exc:  # noqa: BLE001 - GPU is an optimisation; CPU search still works
        logger.warning("faiss GPU transfer failed (%s); searching on CPU", exc)
        return index


def serialize(index: faiss.Index) -> bytes:
    """Bytes of a (CPU) index, for atomic writes."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
