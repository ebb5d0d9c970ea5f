from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from carsearch.config import IndexConfig
from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import GalleryIndex, ItemRecord, gallery
from carsearch.index.backend import build_index, choose_kind
from tests.unit.index.test_backend import clustered

IDENTITY = {"spec": {"backbone": "b"}, "dim": 8, "fingerprint": "abc", "source": "test"}


def unit_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def records(n: int) -> list[ItemRecord]:
    return [ItemRecord(path=f"img_{i}.jpg", label=f"c{i % 3}", content_hash=f"h{i}") for i in range(n)]


def make_index(n: int = 20, **config: object) -> GalleryIndex:
    index = GalleryIndex(8, {"embedder": IDENTITY}, IndexConfig(use_gpu=False, **config))  # type: ignore[arg-type]
    index.add(unit_vectors(n), records(n))
    return index


def test_every_item_retrieves_itself_first() -> None:
    index = make_index(50)
    scores, ids = index.search(index.vectors, 3)
    assert ids[:, 0].tolist() == list(range(50))
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_search_matches_numpy_brute_force() -> None:
    index = make_index(100)
    queries = unit_vectors(5, seed=1)
    _, ids = index.search(queries, 10)
    expected = np.argsort(-(queries @ index.vectors.T), axis=1)[:, :10]
    assert (ids == expected).all()


def test_k_larger_than_gallery_is_capped() -> None:
    _, ids = make_index(4).search(unit_vectors(1), 10)
    assert ids.shape == (1, 4)


def test_empty_gallery_search_is_a_clear_error() -> None:
    index = GalleryIndex(8, {"embedder": IDENTITY})
    with pytest.raises(EmptyGalleryError, match="empty"):
        index.search(unit_vectors(1), 5)


def test_wrong_dimension_is_refused() -> None:
    index = make_index(5)
    with pytest.raises(IndexMismatchError, match="dimension 4"):
        index.search(unit_vectors(1, dim=4), 3)
    with pytest.raises(IndexMismatchError):
        index.add(unit_vectors(2, dim=4), records(2))


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = make_index(30)
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False), embedder_identity=IDENTITY)
    assert loaded.records == index.records
    assert np.array_equal(loaded.vectors, index.vectors)
    q = unit_vectors(3, seed=5)
    assert (loaded.search(q, 5)[1] == index.search(q, 5)[1]).all()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["count"] == 30 and manifest["dim"] == 8 and manifest["index_kind"] == "flat"


def test_load_refuses_another_embedder(tmp_path: Path) -> None:
    make_index(5).save(tmp_path / "idx")
    other = {**IDENTITY, "fingerprint": "different"}
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        GalleryIndex.load(tmp_path / "idx", embedder_identity=other)
    with pytest.raises(IndexMismatchError, match="dim"):
        GalleryIndex.load(tmp_path / "idx", embedder_identity={**IDENTITY, "dim": 16})


def test_load_detects_inconsistent_files(tmp_path: Path) -> None:
    make_index(5).save(tmp_path / "idx")
    items = tmp_path / "idx" / "items.arrow"
    make_index(3).records.write(items.open("wb"))  # a record file of another length
    with pytest.raises(IndexMismatchError, match="damaged: items.arrow"):
        GalleryIndex.load(tmp_path / "idx")
    manifest = tmp_path / "idx" / "manifest.json"
    legacy = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"}
    manifest.write_text(json.dumps(legacy))  # an index written before checksums: the count check remains
    with pytest.raises(IndexMismatchError, match="inconsistent"):
        GalleryIndex.load(tmp_path / "idx")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["vectors.npy", "items.arrow", "index.faiss"])
def test_a_file_of_the_right_length_but_wrong_content_is_refused_with_how_to_rebuild(tmp_path: Path, name: str) -> None:
    """Counts cannot see a half-copied or edited file of the right size; the manifest's checksums can."""
    make_index(5).save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vectors.npy", "items.arrow", "index.faiss"}
    path = tmp_path / "idx" / name
    size = path.stat().st_size
    _flip_byte(path, size - 3)  # inside the vectors / the last record / the faiss payload
    assert path.stat().st_size == size
    with pytest.raises(IndexMismatchError, match=rf"damaged: {name}.*carsearch index SOURCE --out FOLDER"):
        GalleryIndex.load(tmp_path / "idx")
    path.unlink()
    if name == "index.faiss":  # derived from the vectors: rebuilt when missing
        assert len(GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False))) == 5
        return
    with pytest.raises(IndexMismatchError, match=rf"damaged: {name} is missing"):
        GalleryIndex.load(tmp_path / "idx")


def test_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(IndexMismatchError, match="not a carsearch index"):
        GalleryIndex.load(tmp_path)


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    make_index(5).save(tmp_path / "idx")
    make_index(7).save(tmp_path / "idx")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert names == ["index.faiss", "items.arrow", "manifest.json", "vectors.npy"]


def test_auto_kind_switches_to_ivf_for_big_galleries() -> None:
    config = IndexConfig(ivf_threshold=1000, use_gpu=False)
    assert choose_kind(config, 999) == "flat"
    assert choose_kind(config, 1000) == "ivf"
    vectors = unit_vectors(2000, dim=16, seed=3)
    ivf = build_index(vectors, config)
    assert ivf.ntotal == 2000 and ivf.is_trained
    _, ids = ivf.search(vectors[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9  # approximate, but finds itself


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_explicit_kinds_save_and_reload(tmp_path: Path, kind: str) -> None:
    index = GalleryIndex(8, {"embedder": IDENTITY}, IndexConfig(kind=kind, use_gpu=False))  # type: ignore[arg-type]
    index.add(unit_vectors(200), [ItemRecord(path=f"{i}", label=None, content_hash="") for i in range(200)])
    index.save(tmp_path / kind)
    loaded = GalleryIndex.load(tmp_path / kind, IndexConfig(kind=kind, use_gpu=False))  # type: ignore[arg-type]
    assert loaded.manifest.index_kind == kind
    _, ids = loaded.search(loaded.vectors[:10], 1)
    assert (ids[:, 0] == np.arange(10)).mean() >= 0.8


SCALE = {"ivf_threshold": 1_000, "pq_threshold": 12_000}  # auto's thresholds, small enough for a unit test


def scale_index(n: int, **config: object) -> GalleryIndex:
    index = GalleryIndex(32, {"embedder": IDENTITY}, IndexConfig(use_gpu=False, **{**SCALE, **config}))  # type: ignore[arg-type]
    index.add(clustered(n, clusters=300), records(n))
    return index


@pytest.mark.parametrize(("n", "kind", "parameter"), [(12_000, "auto", "nprobe"), (3_000, "hnsw", "ef_search")])
def test_compressed_and_graph_indexes_round_trip_with_their_measured_recall(
    tmp_path: Path, n: int, kind: str, parameter: str
) -> None:
    index = scale_index(n, kind=kind)
    queries = clustered(20, clusters=300, seed=7)
    before = index.search(queries, 10)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    expected_kind = "ivfpq" if kind == "auto" else kind  # 12,000 items >= pq_threshold
    stored = manifest["index"]
    assert manifest["index_kind"] == stored["kind"] == expected_kind
    assert stored["recall_at_10"] >= stored["target_recall"] == 0.95 and stored["sample"] == 1_000
    assert stored[parameter] >= 1 and stored["bytes_per_vector"] > 0
    loaded = GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False), embedder_identity=IDENTITY)
    assert isinstance(loaded.vectors, np.memmap)  # the float vectors stay on disk
    assert index_info(loaded) == stored
    after = loaded.search(queries, 10)
    assert (after[1] == before[1]).all()
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert (loaded.search(loaded.vectors[:50], 1)[1][:, 0] == np.arange(50)).mean() >= 0.9


def test_ivfpq_scores_are_exact_cosines_and_its_ram_fits_the_budget(tmp_path: Path) -> None:
    index = scale_index(12_000, kind="ivfpq", max_bytes_per_vector=40)
    queries = clustered(10, clusters=300, seed=3)
    scores, ids = index.search(queries, 5)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, index.vectors[ids]), atol=1e-5)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["index"]["bytes_per_vector"] <= 40
    assert manifest["files"]["index.faiss"]["bytes"] < manifest["files"]["vectors.npy"]["bytes"] / 3


def cpu_index(gallery: GalleryIndex) -> Any:
    """The gallery's CPU faiss index (built and tuned on first use), search parameters set."""
    return gallery._cpu_index()


def index_info(gallery: GalleryIndex) -> dict[str, Any]:
    """The built index's kind and search parameter, with the recall@10 measured when it was chosen."""
    gallery._cpu_index()
    return dict(gallery._info)


def test_the_stored_nprobe_is_reapplied_on_load_and_a_configured_one_wins(tmp_path: Path) -> None:
    scale_index(3_000, kind="ivf").save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tuned = manifest["index"]["nprobe"]
    manifest["index"]["nprobe"] = tuned + 3  # not what the faiss file holds: only the manifest can set it
    manifest_path.write_text(json.dumps(manifest))
    loaded = GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False))
    assert faiss.extract_index_ivf(cpu_index(loaded)).nprobe == tuned + 3
    fixed = GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False, nprobe=1))
    assert faiss.extract_index_ivf(cpu_index(fixed)).nprobe == 1


def test_a_new_gallery_is_tuned_again_after_add() -> None:
    index = scale_index(3_000, kind="ivf")
    first = index_info(index)
    assert first["kind"] == "ivf" and first["recall_at_10"] >= 0.95
    index.add(clustered(3_000, clusters=300, seed=9), records(3_000))
    assert cpu_index(index).ntotal == 6_000 and index_info(index)["recall_at_10"] >= 0.95


def test_files_over_the_checksum_limit_are_checked_for_size_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_index(30).save(tmp_path / "idx")
    _flip_byte(tmp_path / "idx" / "vectors.npy", -3)
    with pytest.raises(IndexMismatchError, match="damaged: vectors.npy"):
        GalleryIndex.load(tmp_path / "idx")
    monkeypatch.setattr(gallery, "VERIFY_MAX_BYTES", 100)  # the vectors file (~1 kB) is now "large"
    assert len(GalleryIndex.load(tmp_path / "idx", IndexConfig(use_gpu=False))) == 30  # not read to hash it
    path = tmp_path / "idx" / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IndexMismatchError, match="damaged: vectors.npy"):  # a short copy is still refused
        GalleryIndex.load(tmp_path / "idx")


def test_loads_during_saves_see_one_committed_state_each(tmp_path: Path) -> None:
    """A reader never waits for a writer and never sees half a save: every load in a loop while another
    thread commits saves of other sizes succeeds, with vectors, records and manifest of one commit."""
    folder, sizes = tmp_path / "idx", [40, 900, 120, 2000, 60]
    make_index(sizes[0]).save(folder)
    seen: list[tuple[int, int, int]] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                index = GalleryIndex.load(folder, IndexConfig(use_gpu=False))
            except Exception as exc:  # every kind counts
                failures.append(exc)
            else:
                seen.append((len(index.vectors), len(index.records), index.manifest.count))

    reader = threading.Thread(target=read)
    reader.start()
    deadline, saves = time.monotonic() + 60, 0
    try:
        while saves < 20 or (len({c for _, _, c in seen}) < 3 and time.monotonic() < deadline):
            make_index(sizes[saves % len(sizes)]).save(folder)
            saves += 1
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[:3]
    assert all(v == r == c and c in sizes for v, r, c in seen), [s for s in seen if len(set(s)) > 1][:3]
    assert len({c for _, _, c in seen}) >= 3  # the reader saw several commits, not one
