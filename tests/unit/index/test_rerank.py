"""Search post-processing: each method's defining behaviour on small generated galleries."""

from __future__ import annotations

import numpy as np
import pytest

from carsearch.config import IndexConfig, RetrievalConfig, rerank_overrides
from carsearch.errors import ConfigError
from carsearch.index import GalleryIndex, ItemRecord
from carsearch.index.rerank import expand, k_reciprocal_distances, normalise, reciprocal_neighbours
from carsearch.pipeline import evaluate_index
from carsearch.types import CropPlan, SearchHit, SearchResult

DIM = 16


def gallery_of(vectors: np.ndarray, labels: list[str]) -> GalleryIndex:
    index = GalleryIndex(vectors.shape[1], {}, IndexConfig(use_gpu=False))
    index.add(
        normalise(vectors),
        [ItemRecord(path=f"{i}.jpg", label=name, content_hash=f"h{i}") for i, name in enumerate(labels)],
    )
    return index


def clustered(classes: int = 30, per_class: int = 12, noise: float = 1.0, seed: int = 0) -> GalleryIndex:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, DIM))
    vectors = np.concatenate([c + noise * rng.normal(size=(per_class, DIM)) for c in centres])
    return gallery_of(vectors, [f"c{i // per_class}" for i in range(classes * per_class)])


def hub_case() -> tuple[np.ndarray, np.ndarray]:
    """A query whose single nearest item (row 0, class B) belongs to a tight cluster of its own, while the
    query's own class (rows 1-4) are mutual neighbours of the query."""
    rng = np.random.default_rng(1)
    e = np.eye(DIM)
    same = normalise(e[0] + 0.25 * rng.normal(size=(4, DIM)) / np.sqrt(DIM))
    others = normalise(e[1] + 0.1 * rng.normal(size=(6, DIM)) / np.sqrt(DIM))
    hub = normalise(e[1] + 0.75 * e[0])
    return normalise(e[0] + 0.9 * e[1]), np.concatenate([hub[None], same, others])


def test_k_reciprocal_puts_the_querys_cluster_above_a_nearest_item_of_another_cluster() -> None:
    query, candidates = hub_case()
    assert np.argmax(candidates @ query) == 0  # plain search: the other class first
    order = np.argsort(k_reciprocal_distances(query, candidates, k1=4, k2=1, lambda_value=0.3))
    assert set(order[:3]) <= {1, 2, 3, 4}  # after re-ranking: the query's class first
    assert order.tolist().index(0) >= 3


def test_reciprocal_neighbours_need_both_directions() -> None:
    # points on a line at 0, 1, 3, 10: nearest of 0 is 1 and of 1 is 0 (mutual); 3 -> 1 and 10 -> 3 are one-sided
    positions = np.array([0.0, 1.0, 3.0, 10.0])
    rank = np.argsort(np.abs(positions[:, None] - positions[None, :]), axis=1, kind="stable")
    sets = reciprocal_neighbours(rank, 1)
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(sets), strict=True) if i != j} == {(0, 1), (1, 0)}
    assert sets.diagonal().all() and (sets == sets.T).all()
    # against the definition on random points
    points = np.random.default_rng(0).normal(size=(30, 4))
    rank = np.argsort(((points[:, None] - points[None]) ** 2).sum(-1), axis=1, kind="stable")
    sets = reciprocal_neighbours(rank, 5)
    top = [set(row[:6].tolist()) for row in rank]
    assert all(sets[i, j] == (j in top[i] and i in top[j]) for i in range(30) for j in range(30))


def test_k_reciprocal_with_lambda_one_is_the_plain_order() -> None:
    query, candidates = hub_case()
    plain = np.argsort(-(candidates @ query), kind="stable")
    assert np.argsort(k_reciprocal_distances(query, candidates, 4, 1, lambda_value=1.0), kind="stable").tolist() == (
        plain.tolist()
    )


def test_retrieve_reranks_the_gallery_search_and_keeps_cosine_scores() -> None:
    query, candidates = hub_case()
    gallery = gallery_of(candidates, ["b"] + ["a"] * 4 + ["b"] * 6)
    _, plain = gallery.retrieve(query[None], 3)
    scores, ids = gallery.retrieve(query[None], 3, RetrievalConfig(kreciprocal=True, k1=4, k2=1, candidates=11))
    assert plain[0, 0] == 0 and set(ids[0]) <= {1, 2, 3, 4}
    assert np.allclose(scores[0], gallery.vectors[ids[0]] @ query, atol=1e-5)


def test_search_results_allow_unsorted_cosine_scores_only_when_reranked() -> None:
    hits = (SearchHit(1, 7, 0.62, "a", "7.jpg"), SearchHit(2, 3, 0.80, "b", "3.jpg"))
    with pytest.raises(ValueError, match="decreasing score"):
        SearchResult(CropPlan(None, None), hits)
    assert SearchResult(CropPlan(None, None), hits, reranked=True).hits == hits


def test_expand_is_the_normalised_weighted_sum_and_no_neighbours_change_nothing() -> None:
    rng = np.random.default_rng(0)
    queries, gallery = normalise(rng.normal(size=(2, DIM))), normalise(rng.normal(size=(5, DIM)))
    ids, scores = np.array([[3, 1], [-1, -1]]), np.array([[0.8, 0.4], [-np.inf, -np.inf]])
    out = expand(queries, gallery, scores, ids, alpha=3.0)
    assert np.allclose(out[0], normalise(queries[0] + 0.8**3 * gallery[3] + 0.4**3 * gallery[1]), atol=1e-6)
    assert np.allclose(out[1], queries[1], atol=1e-6)  # a query with no expanded neighbours keeps its vector
    assert np.allclose(expand(queries, gallery, scores, ids)[0], normalise(queries[0] + gallery[3] + gallery[1]))


def test_query_expansion_off_or_without_neighbours_equals_plain_search() -> None:
    gallery = clustered()
    queries = gallery.vectors[:20]
    plain = gallery.search(queries, 10)
    for config in (RetrievalConfig(qe_k=0), RetrievalConfig(dba_k=0, kreciprocal=False)):
        got = gallery.retrieve(queries, 10, config)
        assert np.array_equal(got[1], plain[1]) and np.allclose(got[0], plain[0])
    # alpha so large that every neighbour's weight underflows to 0: AQE expands by nothing
    tiny = gallery.retrieve(queries, 10, RetrievalConfig(qe_k=3, qe_alpha=1e6))
    assert np.array_equal(tiny[1], plain[1])


def test_query_expansion_searches_again_with_the_query_plus_its_top_hits() -> None:
    gallery = clustered()
    query = normalise(gallery.vectors[:1] + np.random.default_rng(5).normal(scale=0.5, size=(1, DIM)))
    _, top = gallery.search(query, 2)
    expanded = normalise(query + gallery.vectors[top[0]].sum(0))
    scores, ids = gallery.retrieve(query, 8, RetrievalConfig(qe_k=2))
    want_scores, want_ids = gallery.search(expanded, 8)
    assert np.array_equal(ids, want_ids) and np.allclose(scores, want_scores, atol=1e-5)
    assert scores[0, 0] > gallery.search(query, 1)[0][0, 0]  # the expanded query sits closer to its top hit


def test_dba_averages_each_vector_with_its_neighbours_once() -> None:
    gallery = clustered(classes=5, per_class=4)
    augmented = gallery.augmented(2)
    assert gallery.augmented(2) is augmented  # computed once per setting
    _, ids = gallery.search(gallery.vectors[:1], 3)
    neighbours = [i for i in ids[0] if i != 0][:2]
    expected = normalise(gallery.vectors[0] + gallery.vectors[neighbours].sum(0))
    assert np.allclose(augmented.vectors[0], expected, atol=1e-5)
    gallery.add(gallery.vectors[:1], gallery.records[:1])
    assert gallery.augmented(2) is not augmented  # adding items invalidates it


def test_post_processing_raises_map_at_r_on_clustered_data() -> None:
    gallery = clustered(noise=1.0)
    plain = evaluate_index(gallery).metrics
    for config in (RetrievalConfig(qe_k=2), RetrievalConfig(dba_k=2), RetrievalConfig(kreciprocal=True)):
        better = evaluate_index(gallery, config).metrics
        assert better.map_at_r > plain.map_at_r + 0.02, config
        assert better.num_queries == plain.num_queries


def test_leave_one_out_never_returns_the_query_itself() -> None:
    gallery = clustered(classes=4, per_class=5)
    itself = [{i} for i in range(len(gallery))]
    for config in (RetrievalConfig(qe_k=2), RetrievalConfig(kreciprocal=True, candidates=10)):
        _, ids = gallery.retrieve(gallery.vectors, 5, config, exclude=itself)
        assert all(i not in row for i, row in enumerate(ids))


def test_rerank_presets_and_validation() -> None:
    assert rerank_overrides("aqe, dba") == [
        "retrieval.qe_k=2",
        "retrieval.qe_alpha=3.0",
        "retrieval.dba_k=5",
        "retrieval.dba_alpha=3.0",
    ]
    assert "retrieval.kreciprocal=true" in rerank_overrides("kreciprocal")
    assert "retrieval.kreciprocal=false" in rerank_overrides("none")
    with pytest.raises(ConfigError, match="unknown re-ranking 'bogus'"):
        rerank_overrides("bogus")
    with pytest.raises(ConfigError, match="lambda_value"):
        RetrievalConfig(lambda_value=2.0)
    assert RetrievalConfig().plain and not RetrievalConfig(dba_k=1).plain
