from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from carsearch.config import IndexConfig
from carsearch.index import backend
from carsearch.index.gallery import open_vectors, write_array


def clustered(n: int, dim: int = 32, clusters: int = 100, seed: int = 0, noise: float = 0.4) -> np.ndarray:
    """L2-normalised vectors around ``clusters`` random centres: neighbours exist, unlike uniform noise.

    ``noise`` 0.4: well-separated clusters; ~1: clusters overlap, neighbours spread over IVF lists.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_picks_flat_then_ivf_then_ivfpq_by_item_count() -> None:
    config = IndexConfig(ivf_threshold=100, pq_threshold=20_000)
    assert [backend.choose_kind(config, n) for n in (0, 99, 100, 19_999, 20_000)] == [
        "flat", "flat", "ivf", "ivf", "ivfpq"
    ]  # fmt: skip
    defaults = IndexConfig()  # exact below 100k items, compressed from there on
    assert [backend.choose_kind(defaults, n) for n in (99_999, 100_000, 10**8)] == ["flat", "ivfpq", "ivfpq"]
    assert backend.choose_kind(IndexConfig(kind="ivfpq"), backend.IVFPQ_MIN_ITEMS - 1) == "flat"  # too few for PQ
    assert backend.choose_kind(IndexConfig(kind="hnsw"), 5) == "hnsw"


def test_ivfpq_code_size_follows_the_byte_budget() -> None:
    """Half the budget for 4-bit PQ codes (a power of two), one principal component per sub-quantizer."""
    assert backend.ivfpq_factory(1280, 1_000_000, 64) == "PCAR64,IVF4000,PQ64x4fs"  # 32-byte codes
    assert backend.ivfpq_factory(1280, 1_000_000, 40) == "PCAR32,IVF4000,PQ32x4fs"  # 16-byte codes
    assert backend.ivfpq_factory(512, 10_000_000, 200) == "PCAR128,IVF12649,PQ128x4fs"  # capped at 64 bytes
    assert backend.ivfpq_factory(32, 20_000, 64) == "PCAR32,IVF512,PQ32x4fs"  # no more codes than dimensions
    assert backend.ivfpq_factory(1280, 1_000_000, 64, fast_scan=False) == "PCAR64,IVF4000,PQ32np"  # for the GPU
    with pytest.raises(ValueError, match="max_bytes_per_vector"):
        backend.ivfpq_factory(1280, 1_000_000, 15)


def test_ivfpq_index_stays_within_its_bytes_per_vector() -> None:
    vectors = clustered(50_000, dim=64)
    index = backend.build_index(vectors, IndexConfig(kind="ivfpq", max_bytes_per_vector=64))
    assert index.ntotal == 50_000 and index.is_trained and index.metric_type == faiss.METRIC_L2
    assert faiss.extract_index_ivf(index).code_size == 32
    assert memory_bytes(index) / len(vectors) <= 64  # codes, ids, padding, centroids, PCA: all of it
    small = backend.build_index(vectors, IndexConfig(kind="ivfpq", max_bytes_per_vector=32))
    assert faiss.extract_index_ivf(small).code_size == 16 and memory_bytes(small) < memory_bytes(index)


def memory_bytes(index: faiss.Index) -> int:
    """Bytes of a CPU index's data: its serialised size (codes, ids, centroids, graph)."""
    return int(faiss.serialize_index(index).size)


def test_rescoring_returns_exact_scores_read_from_a_memory_map(tmp_path: Path) -> None:
    vectors = clustered(12_000)
    index = backend.build_index(vectors, IndexConfig(kind="ivfpq", nprobe=8))
    write_array(tmp_path / "v.npy", vectors)
    mapped = open_vectors(tmp_path / "v.npy")
    assert isinstance(mapped, np.memmap)
    queries = clustered(20, seed=1)
    approx_scores, approx_ids = backend.search(index, queries, 10)
    scores, ids = backend.search(index, queries, 10, mapped, rescore=10)
    exact = np.take_along_axis(queries @ vectors.T, ids, axis=1)
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # true cosine similarities, best first
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert np.abs(approx_scores - np.take_along_axis(queries @ vectors.T, approx_ids, axis=1)).max() > 1e-3
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    hits = [len(set(a) & set(b)) for a, b in zip(ids.tolist(), truth.tolist(), strict=True)]
    approx_hits = [len(set(a) & set(b)) for a, b in zip(approx_ids.tolist(), truth.tolist(), strict=True)]
    assert sum(hits) >= sum(approx_hits) and sum(hits) / truth.size >= 0.9


def test_search_parameters_are_set_on_every_approximate_kind() -> None:
    vectors = clustered(12_000)
    for kind in ("ivf", "ivfpq"):
        index = backend.build_index(vectors, IndexConfig(kind=kind, nprobe=3))  # type: ignore[arg-type]
        assert faiss.extract_index_ivf(index).nprobe == 3
        assert backend.set_search_parameter(index, kind, 10**6) == faiss.extract_index_ivf(index).nlist  # capped
    hnsw = backend.build_index(vectors[:500], IndexConfig(kind="hnsw", ef_search=40))
    assert hnsw.hnsw.efSearch == 40
    assert backend.build_index(vectors[:500], IndexConfig(kind="hnsw")).hnsw.efSearch == backend.DEFAULT_EF_SEARCH


def test_training_uses_a_bounded_random_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "TRAIN_MIN", 1_000)
    vectors = clustered(20_000)
    sample = backend.train_sample(vectors, nlist=10)
    assert sample.shape == (1_000, 32) and sample.flags.c_contiguous
    rows = {v.tobytes() for v in vectors}
    assert all(s.tobytes() in rows for s in sample)
    assert not np.array_equal(sample, vectors[:1_000])  # drawn across the gallery, not its head
    assert len(backend.train_sample(vectors, nlist=100)) == 100 * backend.TRAIN_PER_LIST  # more lists, more rows


class _FakeClonerOptions:
    shard = False


def test_gpu_path_shards_over_all_visible_gpus_and_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of faiss-gpu (no GPU build here): sharded over every GPU, CPU on failure, HNSW stays."""
    calls: list[tuple[int, bool]] = []
    created: list[object] = []

    def resources() -> object:
        created.append(object())
        return created[-1]

    def to_gpus(res: list[object], index: faiss.Index, options: _FakeClonerOptions) -> faiss.Index:
        calls.append((len(res), options.shard))
        return faiss.IndexFlatIP(index.d)

    monkeypatch.setattr(faiss, "StandardGpuResources", resources, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", _FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", to_gpus, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(backend, "_GPU_RESOURCES", [])
    flat = backend.build_index(clustered(10), IndexConfig(kind="flat"))
    assert backend.to_search_device(flat, use_gpu=True) is not flat
    assert backend.to_search_device(flat, use_gpu=True) is not flat
    assert calls == [(2, True), (2, True)] and len(created) == 2  # one resource per GPU, made once
    assert backend.to_search_device(flat, use_gpu=False) is flat
    hnsw = backend.build_index(clustered(10), IndexConfig(kind="hnsw"))
    assert backend.to_search_device(hnsw, use_gpu=True) is hnsw

    def broken(*args: object) -> object:
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", broken, raising=False)
    assert backend.to_search_device(flat, use_gpu=True) is flat
    vectors = clustered(12_000)
    config = IndexConfig(kind="ivfpq", max_bytes_per_vector=16, use_gpu=True)
    for_gpu = backend.build_index(vectors, config)  # kept: the IVF inside belongs to it
    gpu_codes = faiss.downcast_index(faiss.extract_index_ivf(for_gpu))
    assert type(gpu_codes) is faiss.IndexIVFPQ and gpu_codes.code_size == 8  # 8-bit PQ: what faiss-gpu holds
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert backend.to_search_device(flat, use_gpu=True) is flat
    for_cpu = backend.build_index(vectors, config)
    cpu_codes = faiss.downcast_index(faiss.extract_index_ivf(for_cpu))
    assert type(cpu_codes) is faiss.IndexIVFPQFastScan and cpu_codes.code_size == 8
