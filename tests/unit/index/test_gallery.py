from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from carsearch.config import IndexConfig
from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import GalleryIndex, ItemRecord
from carsearch.index.backend import build_index, choose_kind

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
    items = tmp_path / "idx" / "items.jsonl"
    items.write_text("\n".join(items.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(IndexMismatchError, match="damaged: items.jsonl"):
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


@pytest.mark.parametrize("name", ["vectors.npy", "items.jsonl", "index.faiss"])
def test_a_file_of_the_right_length_but_wrong_content_is_refused_with_how_to_rebuild(tmp_path: Path, name: str) -> None:
    """Counts cannot see a half-copied or edited file of the right size; the manifest's checksums can."""
    make_index(5).save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vectors.npy", "items.jsonl", "index.faiss"}
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
    assert names == ["index.faiss", "items.jsonl", "manifest.json", "vectors.npy"]


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
    assert loaded.manifest["index_kind"] == kind
    _, ids = loaded.search(loaded.vectors[:10], 1)
    assert (ids[:, 0] == np.arange(10)).mean() >= 0.8


def test_gpu_transfer_is_used_when_faiss_sees_a_gpu_and_falls_back_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of faiss-gpu (no GPU build here): moved when available, CPU on failure, HNSW stays."""
    import faiss

    from carsearch.index import backend

    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(backend, "_GPU_RESOURCES", None)

    def fake_to_gpu(resources: object, device: int, index: object) -> object:
        moved.append(device)
        return faiss.IndexFlatIP(index.d)  # type: ignore[attr-defined]

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_to_gpu, raising=False)
    flat = build_index(unit_vectors(10), IndexConfig(kind="flat"))
    assert backend.to_search_device(flat, use_gpu=True) is not flat and moved == [0]
    assert backend.to_search_device(flat, use_gpu=False) is flat
    hnsw = build_index(unit_vectors(10), IndexConfig(kind="hnsw"))
    assert backend.to_search_device(hnsw, use_gpu=True) is hnsw

    def broken(*args: object) -> object:
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken, raising=False)
    assert backend.to_search_device(flat, use_gpu=True) is flat
