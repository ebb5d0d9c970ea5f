"""carsearch.metrics: leave-one-out retrieval metrics, checked against pytorch-metric-learning and by hand."""

from __future__ import annotations

from dataclasses import replace

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

from carsearch.metrics import (
    RECALL_KS,
    RetrievalMetrics,
    evaluate_embeddings,
    label_counts_excluding_self,
    leave_one_out_neighbours,
    relevance_matrix,
    retrieval_metrics,
)

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _clustered(seed: int, counts: list[int], dim: int = 16, spread: float = 0.9):
    """Unit-norm embeddings around one random centre per label (noisy enough that retrieval errs)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(counts), dim))
    labels = np.repeat(np.arange(len(counts)), counts)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    x, labels = x[order], labels[order]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, labels


def _search_fn(x: np.ndarray):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return lambda k: index.search(x, k)[1]


def _pml(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    calculator = AccuracyCalculator(
        include=PML_METRICS, k="max_bin_count", knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP)
    )
    return calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))


def _brute_force(x: np.ndarray, labels: np.ndarray, ks=RECALL_KS) -> dict[str, float]:
    """Leave-one-out metrics with a full sort, straight from the definitions (independent of the package)."""
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    recall = {k: [] for k in ks}
    p1, r_prec, map_r = [], [], []
    for i in range(len(x)):
        big_r = int((labels == labels[i]).sum()) - 1
        if big_r == 0:
            continue
        ranked = np.argsort(-similarity[i], kind="stable")[: len(x) - 1]
        hits = labels[ranked] == labels[i]
        for k in ks:
            recall[k].append(float(hits[:k].any()))
        p1.append(float(hits[0]))
        r_prec.append(hits[:big_r].sum() / big_r)
        precisions = np.cumsum(hits[:big_r]) / np.arange(1, big_r + 1)
        map_r.append((precisions * hits[:big_r]).sum() / big_r)
    return {
        "recall": {k: float(np.mean(v)) for k, v in recall.items()},
        "precision_at_1": float(np.mean(p1)),
        "r_precision": float(np.mean(r_prec)),
        "mean_average_precision_at_r": float(np.mean(map_r)),
        "num_queries": len(p1),
    }


# seed, class sizes (one with a lone label, one with classes larger than max(ks) = 8, one where k is clipped)
CASES = [
    (0, [5, 5, 5, 5]),
    (1, [3, 7, 4, 1, 6, 2]),  # label 3 is lone
    (2, [12, 15, 9, 11]),  # R up to 14 > max(ks)
    (3, [2, 2, 2, 1, 1]),  # tiny gallery, two lone labels, k clipped to N - 1
    (4, [10] * 8),
]


@pytest.mark.parametrize(("seed", "counts"), CASES, ids=[f"seed{s}-{len(c)}classes" for s, c in CASES])
def test_matches_pytorch_metric_learning(seed, counts):
    x, labels = _clustered(seed, counts)
    ours = evaluate_embeddings(_search_fn(x), labels.tolist())
    reference = _pml(x, labels)
    assert ours.precision_at_1 == pytest.approx(reference["precision_at_1"], abs=1e-6)
    assert ours.r_precision == pytest.approx(reference["r_precision"], abs=1e-6)
    assert ours.map_at_r == pytest.approx(reference["mean_average_precision_at_r"], abs=1e-6)
    lone = sum(c == 1 for c in counts)
    assert ours.num_lone_queries == lone
    assert ours.num_queries == len(labels) - lone
    assert ours.recall_at[1] == pytest.approx(ours.precision_at_1)

    brute = _brute_force(x, labels)
    assert ours.num_queries == brute["num_queries"]
    for k in RECALL_KS:
        assert ours.recall_at[k] == pytest.approx(brute["recall"][k], abs=1e-9)
    assert ours.r_precision == pytest.approx(brute["r_precision"], abs=1e-9)
    assert ours.map_at_r == pytest.approx(brute["mean_average_precision_at_r"], abs=1e-9)


def test_reference_is_not_trivial():
    # Guard against a comparison that passes because everything is 0 or 1.
    x, labels = _clustered(1, [3, 7, 4, 1, 6, 2])
    ours = evaluate_embeddings(_search_fn(x), labels.tolist())
    assert 0.0 < ours.map_at_r < 1.0 and 0.0 < ours.r_precision < 1.0
    assert 0.0 < ours.precision_at_1 < 1.0
    assert ours.recall_at[1] <= ours.recall_at[2] <= ours.recall_at[4] <= ours.recall_at[8]
    assert ours.recall_at[8] > ours.recall_at[1]


def test_string_labels_and_custom_ks():
    x, labels = _clustered(5, [4, 6, 3])
    names = np.array(["audi", "bmw", "citroen"])[labels].tolist()
    by_name = evaluate_embeddings(_search_fn(x), names, ks=(1, 3))
    by_int = evaluate_embeddings(_search_fn(x), labels.tolist(), ks=(1, 3))
    assert by_name == by_int
    assert set(by_name.recall_at) == {1, 3}


def test_perfect_clusters_score_one():
    x, labels = _clustered(6, [4, 4, 4], spread=0.01)
    metrics = evaluate_embeddings(_search_fn(x), labels.tolist())
    assert metrics.precision_at_1 == metrics.r_precision == metrics.map_at_r == 1.0
    assert all(v == 1.0 for v in metrics.recall_at.values())


def test_all_lone_and_single_item_galleries():
    x, labels = _clustered(7, [1, 1, 1])
    metrics = evaluate_embeddings(_search_fn(x), labels.tolist())
    assert metrics.num_queries == 0 and metrics.num_lone_queries == 3
    assert metrics.precision_at_1 == metrics.map_at_r == 0.0
    single = evaluate_embeddings(_search_fn(x[:1]), [0])
    assert single.num_queries == 0 and single.num_lone_queries == 1


def test_search_fn_is_asked_for_enough_neighbours():
    x, labels = _clustered(8, [13, 3, 3])  # R = 12 > max(ks) = 8
    requested = []
    search = _search_fn(x)

    def spy(k):
        requested.append(k)
        return search(k)

    evaluate_embeddings(spy, labels.tolist())
    assert requested == [13]  # max(R) + 1 for the query itself
    requested.clear()
    evaluate_embeddings(spy, labels.tolist(), ks=(1, 16))
    assert requested == [17]
    requested.clear()
    evaluate_embeddings(spy, labels.tolist(), ks=(1, 100))
    assert requested == [len(labels)]  # never more than the gallery


# --------------------------------------------------------------------------- retrieval_metrics by hand

# Three queries, K = 4 ranked neighbours (self already excluded):
#   q0: R = 2, hits [1, 0, 1, 0]
#       R-Precision = hits in top 2 / 2 = 1/2
#       MAP@R = (P@1 * 1 + P@2 * 0) / 2 = (1 + 0) / 2 = 1/2
#       Recall@1 = 1, Recall@2 = 1, Recall@4 = 1
#   q1: R = 3, hits [0, 1, 1, 0]
#       R-Precision = 2/3
#       MAP@R = (0 + P@2 + P@3) / 3 = (1/2 + 2/3) / 3 = 7/18
#       Recall@1 = 0, Recall@2 = 1, Recall@4 = 1
#   q2: R = 1, hits [0, 0, 0, 1]
#       R-Precision = 0, MAP@R = 0 (the hit at rank 4 is outside the top R = 1)
#       Recall@1 = 0, Recall@2 = 0, Recall@4 = 1
# Means: Recall@1 = 1/3, Recall@2 = 2/3, Recall@4 = 1, P@1 = 1/3,
#        R-Precision = (1/2 + 2/3 + 0) / 3 = 7/18, MAP@R = (1/2 + 7/18 + 0) / 3 = 8/27
HAND_RELEVANT = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
HAND_R = np.array([2, 3, 1])


def test_retrieval_metrics_by_hand():
    metrics = retrieval_metrics(HAND_RELEVANT, HAND_R, ks=(1, 2, 4))
    assert metrics.recall_at == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 1.0})
    assert metrics.precision_at_1 == pytest.approx(1 / 3)
    assert metrics.r_precision == pytest.approx(7 / 18)
    assert metrics.map_at_r == pytest.approx(8 / 27)
    assert metrics.num_queries == 3 and metrics.num_lone_queries == 0


def test_map_at_r_rewards_early_hits():
    # Same R-Precision (1/2), different order: MAP@R = (1/1)/2 = 1/2 versus (1/2)/2 = 1/4.
    early = retrieval_metrics(np.array([[1, 0]]), np.array([2]), ks=(1,))
    late = retrieval_metrics(np.array([[0, 1]]), np.array([2]), ks=(1,))
    assert early.r_precision == late.r_precision == 0.5
    assert early.map_at_r == pytest.approx(0.5)
    assert late.map_at_r == pytest.approx(0.25)


def test_lone_queries_are_excluded_and_counted():
    # a lone query (R = 0) with a spurious "hit" must not change anything
    relevant = np.vstack([HAND_RELEVANT, [[1, 1, 1, 1]], [[0, 0, 0, 0]]])
    num_relevant = np.append(HAND_R, [0, 0])
    metrics = retrieval_metrics(relevant, num_relevant, ks=(1, 2, 4))
    assert metrics.num_queries == 3 and metrics.num_lone_queries == 2
    assert metrics.recall_at == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 1.0})
    assert metrics.r_precision == pytest.approx(7 / 18)
    assert metrics.map_at_r == pytest.approx(8 / 27)


def test_all_lone_queries():
    metrics = retrieval_metrics(np.ones((2, 3), dtype=bool), np.zeros(2, dtype=int), ks=(1, 2))
    assert metrics == RetrievalMetrics({1: 0.0, 2: 0.0}, 0.0, 0.0, 0.0, 0, 2)


def test_too_few_neighbours_for_r_is_an_error():
    with pytest.raises(ValueError, match=r"max\(R\) = 3.*got 2"):
        retrieval_metrics(np.array([[1, 1], [0, 1]]), np.array([3, 1]))
    # only non-lone queries count toward max(R)
    ok = retrieval_metrics(np.array([[1, 0], [0, 0]]), np.array([2, 0]))
    assert ok.num_queries == 1


def test_recall_k_beyond_available_neighbours():
    metrics = retrieval_metrics(np.array([[0, 1], [0, 0]]), np.array([1, 1]), ks=(1, 8))
    assert metrics.recall_at == {1: 0.0, 8: 0.5}


def test_to_dict_uses_string_keys():
    data = retrieval_metrics(HAND_RELEVANT, HAND_R, ks=(1, 2)).to_dict()
    assert set(data["recall_at"]) == {"1", "2"}
    assert data["num_queries"] == 3


def test_flat_names_every_score_once_and_picks_in_order():
    metrics = retrieval_metrics(HAND_RELEVANT, HAND_R, ks=(1, 2))
    flat = metrics.flat()
    assert list(flat) == ["recall_at_1", "recall_at_2", "map_at_r", "r_precision"]  # logged as val/<name>
    assert flat["recall_at_2"] == metrics.recall_at[2] and flat["map_at_r"] == metrics.map_at_r
    picked = metrics.flat(("map_at_r", "recall_at_1"))
    assert picked == {"map_at_r": metrics.map_at_r, "recall_at_1": metrics.recall_at[1]}
    assert replace(metrics, other_year_share=0.5).flat()["other_year_share"] == 0.5


# --------------------------------------------------------------------------- helpers


def test_relevance_matrix():
    relevant = relevance_matrix(["a", "b"], [["a", "b", "a"], ["a", "a", "b"]])
    np.testing.assert_array_equal(relevant, [[True, False, True], [False, False, True]])
    assert relevance_matrix(["a", "b"], [[], []]).shape == (2, 0)
    with pytest.raises(ValueError):
        relevance_matrix(["a", "b"], [["a"]])


def test_label_counts_excluding_self():
    np.testing.assert_array_equal(label_counts_excluding_self(["a", "b", "a", "c", "a"]), [2, 0, 2, 0, 2])


def test_leave_one_out_neighbours():
    ids = np.array(
        [
            [0, 2, 1],  # self first → dropped
            [2, 1, 0],  # self in the middle → dropped, order kept
            [0, 1, 3],  # self (2) not returned → first K kept
            [3, -1, -1],  # faiss pads with -1
        ]
    )
    out = leave_one_out_neighbours(ids, 2)
    np.testing.assert_array_equal(out, [[2, 1], [2, 0], [0, 1], [-1, -1]])


def test_padding_is_never_relevant():
    # 3 items of one label, a search that finds nothing: padded neighbours are misses, not matches
    metrics = evaluate_embeddings(lambda k: np.full((3, k), -1), [1, 1, 1])
    assert metrics.num_queries == 3
    assert metrics.precision_at_1 == 0.0 and metrics.map_at_r == 0.0


# --------------------------------------------------------------------------- same make/model, another year
def test_split_year_reads_a_trailing_year():
    from carsearch.metrics import split_year

    assert split_year("Audi TTS Coupe 2012") == ("Audi TTS Coupe", "2012")
    assert split_year("BMW M3 Coupe 1999 ") == ("BMW M3 Coupe", "1999")
    assert split_year("car 12") is None and split_year("2012") is None and split_year(7) is None


def test_other_year_share_counts_wrong_hits_of_the_same_model():
    from carsearch.metrics import other_year_share

    queries = ["A X 2010", "A X 2010", "A X 2012", "B Y 2011", "B Y 2011"]
    top1 = ["A X 2010", "A X 2012", "B Y 2011", "B Y 2012", "A X 2010"]  # right, year, other, year, other
    assert other_year_share(queries, top1) == pytest.approx(2 / 4)
    assert other_year_share(["A X 2010"], ["A X 2010"]) is None  # nothing wrong
    assert other_year_share(["a", "b"], ["b", "a"]) is None  # labels carry no year


def test_evaluate_embeddings_reports_the_other_year_share():
    # Two models, two years each; each item's nearest other item is its model's other year except item 4.
    labels = ["M 2010", "M 2010", "M 2011", "N 2010", "N 2011", "N 2011"]
    vectors = np.array([[0.0], [10.0], [1.0], [30.0], [31.0], [50.0]], dtype=np.float32)

    def search(k):
        order = np.argsort(np.abs(vectors - vectors.T), axis=1, kind="stable")
        return order[:, :k]

    metrics = evaluate_embeddings(search, labels)
    # Lone queries (M 2011, N 2010) are left out. Top-1, self excluded: 0→2 and 1→2 (M 2011: other year),
    # 4→3 (N 2010: other year), 5→4 (right).
    assert metrics.num_queries == 4 and metrics.precision_at_1 == pytest.approx(1 / 4)
    assert metrics.other_year_share == pytest.approx(1.0)
    plain = evaluate_embeddings(search, ["a", "a", "b", "c", "d", "d"])
    assert plain.other_year_share is None
