from __future__ import annotations

import faiss
import numpy as np
import pytest

from carsearch.config import IndexConfig
from carsearch.index import backend, tuning
from tests.unit.index.test_backend import clustered


def test_exact_knn_merges_blocks_like_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "EXACT_BATCH", 70)  # several blocks, the last one short
    vectors, queries = clustered(500), clustered(9, seed=1)
    scores, ids = tuning.exact_knn(queries, vectors, 12)
    sims = queries @ vectors.T
    assert (ids == np.argsort(-sims, axis=1)[:, :12]).all()
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ids, axis=1), atol=1e-5)
    assert tuning.exact_knn(queries, vectors[:5], 12)[1].shape == (9, 5)


def test_drop_self_removes_the_query_item_or_the_last_column() -> None:
    ids = np.array([[7, 3, 5], [2, 9, 4]])
    assert tuning.drop_self(ids, np.array([3, 8]), 2).tolist() == [[7, 5], [2, 9]]


def test_recall_counts_shared_ids_per_row() -> None:
    assert tuning.recall_at(np.array([[1, 2], [3, 4]]), np.array([[2, 9], [3, 4]])) == 0.75


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_tuning_picks_the_smallest_parameter_that_reaches_the_target(kind: str) -> None:
    vectors = clustered(12_000, clusters=300, noise=1.0)  # overlapping clusters: 1 list / 16 nodes are not enough
    config = IndexConfig(kind=kind, target_recall=0.95, hnsw_m=4)  # type: ignore[arg-type]
    index = backend.build_index(vectors, config)
    info = tuning.tune(index, vectors, kind, config, sample=300)
    name = backend.parameter_name(kind)
    assert info["kind"] == kind and info["sample"] == 300 and info["target_recall"] == 0.95
    assert info["recall_at_10"] >= 0.95
    value = info[name]
    assert value == (index.hnsw.efSearch if kind == "hnsw" else faiss.extract_index_ivf(index).nprobe)  # left set
    smaller = [v for v in tuning.candidates(kind, index) if v < value]
    assert smaller  # the data needs more than the cheapest setting...
    fixed = IndexConfig(kind=kind, nprobe=smaller[-1], ef_search=smaller[-1], hnsw_m=4)  # type: ignore[arg-type]
    assert tuning.tune(index, vectors, kind, fixed, sample=300)["recall_at_10"] < 0.95  # ...and the one before fails


def test_a_fixed_parameter_is_kept_and_its_recall_measured() -> None:
    vectors = clustered(5_000, clusters=300, noise=1.0)
    config = IndexConfig(kind="ivf", nprobe=1)
    index = backend.build_index(vectors, config)
    info = tuning.tune(index, vectors, "ivf", config, sample=200)
    assert info["nprobe"] == 1 and faiss.extract_index_ivf(index).nprobe == 1
    assert 0.0 < info["recall_at_10"] < 0.95  # one list of 70 misses neighbours in the others
    everything = tuning.tune(index, vectors, "ivf", IndexConfig(kind="ivf", nprobe=10**6), sample=200)
    assert everything["recall_at_10"] == 1.0  # all lists scanned: exact


def test_an_unreachable_target_keeps_the_largest_value_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    vectors = clustered(12_000, dim=64, clusters=300, noise=1.0)
    config = IndexConfig(kind="ivfpq", max_bytes_per_vector=16, rescore=1, target_recall=1.0)
    index = backend.build_index(vectors, config)
    info = tuning.tune(index, vectors, "ivfpq", config, sample=200)
    assert info["nprobe"] == faiss.extract_index_ivf(index).nlist and info["recall_at_10"] < 1.0
    assert "even at nprobe" in caplog.text


def test_flat_is_exact_without_measuring() -> None:
    index = backend.build_index(clustered(50), IndexConfig(kind="flat"))
    assert tuning.tune(index, clustered(50), "flat", IndexConfig()) == {
        "kind": "flat", "target_recall": 0.95, "recall_at_10": 1.0, "exact": True
    }  # fmt: skip
