"""Retrieval metrics over k-NN labels, with pytorch-metric-learning's AccuracyCalculator definitions.

Leave-one-out: the query is removed from its own neighbour list; queries whose label has no other
gallery item ("lone" queries) are left out of every metric, as PML does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np

RECALL_KS = (1, 2, 4, 8)


@dataclass(frozen=True)
class RetrievalMetrics:
    """Means over non-lone queries. ``recall_at[k]``: share of queries with a same-label item in the top k."""

    recall_at: dict[int, float]
    precision_at_1: float
    r_precision: float
    map_at_r: float
    num_queries: int
    num_lone_queries: int
    other_year_share: float | None = None  # of the wrong top-1 hits: same make and model, another year

    def to_dict(self) -> dict[str, object]:
        """Every field, ``recall_at`` keyed by ``str(k)``: the record an index evaluation writes."""
        data = asdict(self)
        data["recall_at"] = {str(k): v for k, v in self.recall_at.items()}
        return data

    def flat(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """The scores as one flat ``{name: float}``: ``recall_at_<k>`` per k, ``map_at_r``, ``r_precision`` and
        ``other_year_share`` when measured; ``names``: only these, in that order. The names training logs
        (``val/<name>``) and writes to ``metrics.json``, and the experiment's grid uses."""
        scores = {f"recall_at_{k}": float(v) for k, v in self.recall_at.items()}
        scores.update(map_at_r=float(self.map_at_r), r_precision=float(self.r_precision))
        if self.other_year_share is not None:
            scores["other_year_share"] = float(self.other_year_share)
        return scores if names is None else {name: scores[name] for name in names}


def relevance_matrix(query_labels: Sequence[object], neighbour_labels: Sequence[Sequence[object]]) -> np.ndarray:
    """(Q, K) bool: neighbour j of query i has the query's label."""
    return np.array(
        [[n == q for n in row] for q, row in zip(query_labels, neighbour_labels, strict=True)], dtype=bool
    ).reshape(len(query_labels), -1)


def retrieval_metrics(
    relevant: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> RetrievalMetrics:
    """Metrics from ``relevant`` (Q, K) bool, ranked neighbours (self excluded), and ``num_relevant`` (Q,) = R.

    ``K`` must be at least ``max(R)`` for MAP@R and R-Precision to be exact.
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    keep = num_relevant > 0
    lone = int((~keep).sum())
    rel, big_r = relevant[keep], num_relevant[keep]
    if not len(rel):
        return RetrievalMetrics({k: 0.0 for k in ks}, 0.0, 0.0, 0.0, 0, lone)
    if rel.shape[1] < big_r.max():
        raise ValueError(f"need at least max(R) = {big_r.max()} neighbours per query, got {rel.shape[1]}")
    ranks = np.arange(1, rel.shape[1] + 1)
    within_r = ranks[None, :] <= big_r[:, None]
    rel_r = rel & within_r
    r_precision = rel_r.sum(1) / big_r
    precision_at_i = np.cumsum(rel_r, axis=1) / ranks[None, :]
    map_at_r = (precision_at_i * rel_r).sum(1) / big_r
    recall = {k: float(rel[:, : min(k, rel.shape[1])].any(1).mean()) for k in ks}
    return RetrievalMetrics(
        recall_at=recall,
        precision_at_1=float(rel[:, 0].mean()),
        r_precision=float(r_precision.mean()),
        map_at_r=float(map_at_r.mean()),
        num_queries=int(keep.sum()),
        num_lone_queries=lone,
    )


_TRAILING_YEAR = re.compile(r"^(?P<model>.*\S)\s+(?P<year>(?:19|20)\d\d)$")


def split_year(label: object) -> tuple[str, str] | None:
    """``"Audi TTS Coupe 2012"`` → ``("Audi TTS Coupe", "2012")``; None when the label ends in no year."""
    match = _TRAILING_YEAR.match(str(label).strip())
    return (match["model"], match["year"]) if match else None


def other_year_share(query_labels: Sequence[object], top1_labels: Sequence[object]) -> float | None:
    """Share of wrong top-1 hits whose label is the query's make and model in another year.

    Stanford Cars names classes "Make Model Body Year"; such confusions are the nearly indistinguishable
    ones. None unless every label ends in a year (the share would mean nothing), or nothing is wrong.
    """
    wrong = [(q, t) for q, t in zip(query_labels, top1_labels, strict=True) if q != t]
    parsed = [(split_year(q), split_year(t)) for q, t in wrong]
    years = [(q, t) for q, t in parsed if q is not None and t is not None]
    if not wrong or len(years) != len(parsed):
        return None
    return sum(q[0] == t[0] for q, t in years) / len(wrong)


def label_counts_excluding_self(labels: Sequence[object]) -> np.ndarray:
    """R for each item of a leave-one-out gallery: how many *other* items share its label."""
    counts = Counter(labels)
    return np.array([counts[label] - 1 for label in labels], dtype=np.int64)


def leave_one_out_neighbours(ids: np.ndarray, k: int) -> np.ndarray:
    """Drop each query's own id from its ranked neighbour ids (Q, K+1) → (Q, K); -1 pads missing."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, row in enumerate(ids):
        row = row[(row != i) & (row >= 0)][:k]
        out[i, : len(row)] = row
    return out


def evaluate_embeddings(
    search_fn: Callable[[int], np.ndarray], labels: Sequence[object], ks: Sequence[int] = RECALL_KS
) -> RetrievalMetrics:
    """Leave-one-out metrics for a gallery; ``search_fn(k)`` returns ranked ids (N, k) of every item."""
    labels = list(labels)
    num_relevant = label_counts_excluding_self(labels)
    k = int(max(max(ks), num_relevant.max(initial=0)))
    k = max(1, min(k, len(labels) - 1))
    neighbour_ids = leave_one_out_neighbours(search_fn(k + 1), k)
    label_array = np.array(labels, dtype=object)
    neighbour_labels = [[label_array[j] if j >= 0 else _MISSING for j in row] for row in neighbour_ids]
    metrics = retrieval_metrics(relevance_matrix(labels, neighbour_labels), num_relevant, ks)
    queries = [i for i, r in enumerate(num_relevant) if r > 0]
    share = other_year_share([labels[i] for i in queries], [neighbour_labels[i][0] for i in queries])
    return replace(metrics, other_year_share=share)


def leave_one_out_metrics(
    vectors: np.ndarray, labels: Sequence[object], ks: Sequence[int] = RECALL_KS
) -> RetrievalMetrics:
    """Leave-one-out metrics of ``vectors`` (N, D), L2-normalised, by exact inner-product search (faiss flat).

    The one evaluation of bare embeddings (training validation and test, the compare grid); a built
    gallery index is evaluated through its own search instead (``carsearch.pipeline.evaluate_index``).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return evaluate_embeddings(lambda k: index.search(vectors, k)[1], labels, ks)


_MISSING = object()
