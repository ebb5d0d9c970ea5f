"""Search post-processing on the gallery's own neighbourhoods: AQE / αQE, DBA, k-reciprocal re-ranking.

- Query expansion (AQE, Chum et al. 2007; αQE, Radenović et al. 2018): the query is replaced by the
  normalised sum of itself and its top hits (weights similarity^alpha; alpha 0 is the plain average) and
  searched again.
- Database-side augmentation (DBA, Arandjelović & Zisserman 2012): every gallery vector is replaced, once,
  by the weighted sum of itself and its nearest gallery neighbours; queries then search those vectors.
- k-reciprocal re-ranking (Zhong et al., CVPR 2017): the top ``candidates`` hits are re-ordered by a blend
  of the Jaccard distance of k-reciprocal neighbour sets and the original distance. The sets are computed
  inside the local set {query} ∪ candidates, so the cost per query depends on ``candidates``, not on the
  gallery size (the paper computes them over the whole query + gallery set).

Scores returned with re-ordered hits stay cosine similarities (query vector after expansion · hit vector);
only the order changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from carsearch.config import RetrievalConfig

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def expand(
    vectors: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, ids: np.ndarray, alpha: float = 0.0
) -> np.ndarray:
    """(Q, D) normalised ``vectors[q] + Σ_j w_qj · neighbours[ids[q, j]]``, ``w = max(score, 0)^alpha``.

    Ids < 0 (no hit) add nothing, so a query without neighbours keeps its own vector. Used for AQE/αQE
    (``vectors``: queries) and for DBA (``vectors``: the gallery itself, its own id excluded).
    """
    valid = ids >= 0
    weights = np.where(valid, np.maximum(scores, 0.0) ** alpha if alpha else 1.0, 0.0).astype(np.float32)
    gathered = neighbours[np.where(valid, ids, 0)]  # (Q, K, D)
    return normalise(vectors + np.einsum("qk,qkd->qd", weights, gathered))


def reciprocal_neighbours(rank: np.ndarray, k: int) -> np.ndarray:
    """(M, M) bool, R(i, k): j is among i's k nearest and i among j's (each item counts as its own nearest).

    ``rank[i]``: the item ids ordered by distance from item i, itself first.
    """
    size = len(rank)
    forward = np.zeros((size, size), dtype=bool)
    forward[np.arange(size)[:, None], rank[:, : min(k, size - 1) + 1]] = True
    return forward & forward.T


def k_reciprocal_distances(
    query: np.ndarray, candidates: np.ndarray, k1: int, k2: int, lambda_value: float
) -> np.ndarray:
    """(K,) re-ranking distances from ``query`` (D,) to ``candidates`` (K, D), all L2-normalised.

    Zhong et al.'s algorithm on the local set {query} ∪ candidates: squared Euclidean distances, column
    normalised; k-reciprocal sets R(i, k1) expanded by the R(j, k1/2) that overlap them by more than 2/3;
    Gaussian-weighted set vectors averaged over each item's k2 nearest (local query expansion); the final
    distance is (1 - λ)·Jaccard + λ·original. Smaller is closer.
    """
    local = np.concatenate([query[None], candidates]).astype(np.float64)
    size = len(local)
    dist = np.clip(2.0 - 2.0 * local @ local.T, 0.0, None)
    dist = dist / np.maximum(dist.max(axis=0, keepdims=True), 1e-12)
    rank = np.argsort(dist, axis=1, kind="stable")
    sets = reciprocal_neighbours(rank, k1)
    halves = reciprocal_neighbours(rank, max(1, round(k1 / 2))).astype(np.float64)
    overlap = sets.astype(np.float64) @ halves.T  # overlap[i, j] = |R(i, k1) ∩ R(j, k1/2)|
    absorb = sets & (overlap > (2.0 / 3.0) * halves.sum(axis=1)[None, :])
    expanded = sets | ((absorb.astype(np.float64) @ halves) > 0)
    weights = np.where(expanded, np.exp(-dist), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    if k2 > 1:
        weights = weights[rank[:, : min(k2, size)]].mean(axis=1)
    shared = np.minimum(weights[0][None, :], weights).sum(axis=1)
    jaccard = 1.0 - shared / (2.0 - shared)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[0]
    return final[1:]


def search_excluding(
    search: SearchFn, queries: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) with ``exclude[q]``'s ids removed from query q's hits; -1 / -inf pad."""
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    scores, ids = search(queries, k + extra)
    if not extra:
        return scores[:, :k], ids[:, :k]
    assert exclude is not None  # extra > 0 only with exclusions
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (s, i) in enumerate(zip(scores, ids, strict=True)):
        keep = [j for j, item in enumerate(i) if item >= 0 and int(item) not in exclude[row]][:k]
        out_scores[row, : len(keep)], out_ids[row, : len(keep)] = s[keep], i[keep]
    return out_scores, out_ids


def augment_database(vectors: np.ndarray, search: SearchFn, k: int, alpha: float = 0.0) -> np.ndarray:
    """DBA: each gallery vector summed with its ``k`` nearest other gallery vectors (weights sim^alpha)."""
    scores, ids = search_excluding(search, vectors, k, [{i} for i in range(len(vectors))])
    return expand(vectors, vectors, scores, ids, alpha)


def retrieve(
    search: SearchFn,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    config: RetrievalConfig,
    exclude: Sequence[set[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) after query expansion and k-reciprocal re-ranking, as ``config`` says.

    ``search(queries, k)`` is the gallery's (possibly DBA-augmented) nearest-neighbour search and
    ``vectors`` the vectors it holds; ``exclude[q]``: ids never returned for query q (leave-one-out,
    the query's own image). With every option off this is the plain search.
    """
    queries = normalise(np.atleast_2d(queries))
    if config.qe_k:
        scores, ids = search_excluding(search, queries, config.qe_k, exclude)
        queries = expand(queries, vectors, scores, ids, config.qe_alpha)
    depth = max(k, config.candidates) if config.kreciprocal else k
    depth = min(depth, len(vectors))
    scores, ids = search_excluding(search, queries, depth, exclude)
    if config.kreciprocal:
        for row in range(len(ids)):
            valid = np.flatnonzero(ids[row] >= 0)
            if len(valid) < 2:
                continue
            dist = k_reciprocal_distances(
                queries[row], vectors[ids[row, valid]], config.k1, config.k2, config.lambda_value
            )
            order = valid[np.argsort(dist, kind="stable")]
            ids[row, : len(order)], scores[row, : len(order)] = ids[row, order], scores[row, order]
    return scores[:, :k], ids[:, :k]
