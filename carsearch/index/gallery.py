"""The gallery index: faiss vectors + per-item records + a manifest, persisted as one directory."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carsearch.config import IndexConfig, RetrievalConfig
from carsearch.data.atomic import atomic_write_bytes, atomic_write_json, jsonl_line
from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import backend, rerank
from carsearch.index.records import ItemRecord

logger = logging.getLogger(__name__)

FORMAT = "carsearch-index"
VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
ITEMS = "items.jsonl"
FAISS = "index.faiss"
REBUILD = "rebuild it: delete the folder and run `carsearch index SOURCE --out FOLDER` again"


class GalleryIndex:
    """Inner-product search over L2-normalised vectors, with the records they came from.

    ``manifest`` describes how the vectors were made (embedder identity, detector, crop mode,
    preprocessing); indexes with different embedders are refused at load and at ``check_embedder``.
    """

    def __init__(self, dim: int, manifest: dict[str, Any], config: IndexConfig | None = None) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {dim}")
        self.dim = dim
        self.manifest = dict(manifest)
        self.config = config or IndexConfig()
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self.records: list[ItemRecord] = []
        self._faiss: Any = None
        self._augmented: dict[tuple[int, float], GalleryIndex] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32, L2-normalised; row i belongs to ``records[i]``."""
        return self._vectors

    def add(self, vectors: np.ndarray, records: Sequence[ItemRecord]) -> None:
        """Append vectors (N, D) and their records."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexMismatchError(f"expected vectors of shape (N, {self.dim}), got {vectors.shape}")
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} records")
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self._vectors) else vectors.copy()
        self.records.extend(records)
        self._faiss = None
        self._augmented = {}

    def _search_index(self) -> Any:
        if self._faiss is None:
            cpu_index = backend.build_index(self._vectors, self.config)
            self._faiss = backend.to_search_device(cpu_index, self.config.use_gpu)
        return self._faiss

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids), each (Q, k'), k' = min(k, N); ids index ``records``."""
        if not len(self):
            raise EmptyGalleryError("the index is empty: add images with `carsearch index` first")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query vectors have dimension {queries.shape[1]}, the index holds dimension {self.dim}"
            )
        k = max(1, min(int(k), len(self)))
        scores, ids = self._search_index().search(queries, k)
        return scores, ids

    def retrieve(
        self,
        queries: np.ndarray,
        k: int,
        config: RetrievalConfig | None = None,
        exclude: Sequence[set[int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with ``config``'s post-processing (DBA, query expansion, k-reciprocal re-ranking).

        ``exclude[q]``: ids never returned for query q. Ids index ``records`` as in :meth:`search`.
        """
        config = config or RetrievalConfig()
        if config.plain and exclude is None:
            return self.search(queries, k)
        if not len(self):
            raise EmptyGalleryError("the index is empty: add images with `carsearch index` first")
        gallery = self.augmented(config.dba_k, config.dba_alpha) if config.dba_k else self
        return rerank.retrieve(gallery.search, gallery.vectors, queries, k, config, exclude)

    def augmented(self, k: int, alpha: float = 0.0) -> GalleryIndex:
        """This gallery after database-side augmentation (DBA) with ``k`` neighbours; computed once."""
        key = (int(k), float(alpha))
        if key not in self._augmented:
            vectors = rerank.augment_database(self._vectors, self.search, k, alpha)
            augmented = GalleryIndex(self.dim, self.manifest, self.config)
            augmented.add(vectors, self.records)
            self._augmented[key] = augmented
        return self._augmented[key]

    def check_embedder(self, identity: dict[str, Any]) -> None:
        """Refuse an embedder whose identity (spec, dim, weights) differs from the index's."""
        check_identity(self.manifest.get("embedder", {}), identity, where="this index")

    def save(self, folder: str | Path) -> None:
        """Write the index directory; each file atomically, the manifest (with counts) last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, self._vectors)
        items = b"".join(jsonl_line(r.to_dict()) for r in self.records)  # hashed below: built in memory
        cpu_index = backend.build_index(self._vectors, self.config)
        contents = {VECTORS: buffer.getvalue(), ITEMS: items, FAISS: backend.serialize(cpu_index)}
        for name, data in contents.items():
            atomic_write_bytes(folder / name, data)
        manifest = {
            **self.manifest,
            "format": FORMAT,
            "version": VERSION,
            "dim": self.dim,
            "count": len(self),
            "index_kind": backend.choose_kind(self.config, len(self)),
            "files": {name: file_digest(data) for name, data in contents.items()},
        }
        atomic_write_json(folder / MANIFEST, manifest)
        self.manifest = manifest

    @classmethod
    def load(
        cls, folder: str | Path, config: IndexConfig | None = None, embedder_identity: dict[str, Any] | None = None
    ) -> GalleryIndex:
        """Open a saved index; with ``embedder_identity``, refuse one built by another embedder."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if embedder_identity is not None:
            check_identity(manifest.get("embedder", {}), embedder_identity, where=str(folder))
        index = cls(int(manifest["dim"]), manifest, config)
        vectors = np.load(io.BytesIO(read_verified(folder, VECTORS, manifest)), allow_pickle=False)
        lines = read_verified(folder, ITEMS, manifest).decode().splitlines()
        records = [ItemRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
        if len(vectors) != manifest["count"] or len(records) != manifest["count"]:
            raise IndexMismatchError(
                f"{folder} is inconsistent: manifest says {manifest['count']} items, found {len(vectors)} "
                f"vectors and {len(records)} records (interrupted write?); re-run `carsearch index`"
            )
        if len(vectors):
            index.add(vectors, records)
        faiss_file = folder / FAISS
        if faiss_file.exists():
            cpu_index = backend.deserialize(read_verified(folder, FAISS, manifest))
            if cpu_index.ntotal == len(index) and cpu_index.d == index.dim:
                index._faiss = backend.to_search_device(cpu_index, index.config.use_gpu)
        return index


def file_digest(data: bytes) -> dict[str, Any]:
    """Size and SHA-256 of a file's bytes, as stored in the manifest."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_verified(folder: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of ``folder/name``, refused unless they match the manifest's size and checksum.

    Indexes written before checksums were stored (no ``files`` in the manifest) are read unchecked.
    """
    path = folder / name
    expected = manifest.get("files", {}).get(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if expected is None and name == ITEMS:
            return b""
        raise IndexMismatchError(f"{folder} is damaged: {name} is missing; {REBUILD}") from None
    if expected is not None and file_digest(data) != expected:
        raise IndexMismatchError(
            f"{folder} is damaged: {name} ({len(data)} bytes) does not match the size and checksum in {MANIFEST} "
            f"({expected['bytes']} bytes): an interrupted copy or a modified file; {REBUILD}"
        )
    return data


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise IndexMismatchError(f"{folder} is not a carsearch index (no {MANIFEST}); build one with `carsearch index`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise IndexMismatchError(f"{folder}/{MANIFEST} is not a carsearch index manifest")
    if int(manifest.get("version", -1)) > VERSION:
        raise IndexMismatchError(f"{folder} has index version {manifest['version']}; this carsearch reads <= {VERSION}")
    return manifest


def check_identity(stored: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise :class:`IndexMismatchError` naming the first field where two embedder identities differ."""
    for key in ("dim", "spec", "fingerprint", "tta"):  # tta: "flip", or absent (no test-time augmentation)
        if stored.get(key) != actual.get(key):
            raise IndexMismatchError(
                f"{where} was built with a different embedder ({key}: index has {stored.get(key)!r}, "
                f"embedder has {actual.get(key)!r}; index source {stored.get('source')!r}, embedder source "
                f"{actual.get('source')!r}). Use the same embedder/checkpoint, or rebuild the index."
            )
