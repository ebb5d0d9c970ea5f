"""The gallery index: faiss vectors + per-item records + a manifest, persisted as one directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import faiss
import numpy as np

from carsearch.config import IndexConfig, RetrievalConfig
from carsearch.data.atomic import atomic_write, atomic_write_bytes, replace_all
from carsearch.errors import EmptyGalleryError, IndexMismatchError
from carsearch.index import backend, rerank, tuning
from carsearch.index.manifest import MANIFEST, REBUILD, Manifest, check_identity
from carsearch.index.records import ItemRecord, RecordTable

logger = logging.getLogger(__name__)

VECTORS = "vectors.npy"
ITEMS = "items.arrow"
LEGACY_ITEMS = "items.jsonl"
FAISS = "index.faiss"
VERIFY_MAX_BYTES = 1 << 30  # files up to 1 GiB are checksummed at load; larger ones: size only (docs/indexing.md)
CHUNK = 16 << 20
STAGED = ".{}.next"  # a save's files before its commit (one quick burst of renames, the manifest last)
SETTLE_SECONDS = 0.25  # how long load retries a folder that stayed the same and still failed its checks
LOAD_ATTEMPTS = 20


class GalleryIndex:
    """Inner-product search over L2-normalised vectors, with the records they came from.

    ``manifest`` describes how the vectors were made (embedder identity, detector, crop mode,
    preprocessing); indexes with different embedders are refused at load.
    An opened index reads its vectors and its records (Arrow columns) through memory maps: RAM holds the faiss
    index and what is read.
    """

    def __init__(self, dim: int, manifest: Manifest | dict[str, Any], config: IndexConfig | None = None) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {dim}")
        self.dim = dim
        self.manifest = manifest.copy() if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
        self.config = config or IndexConfig()
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self.records = RecordTable()
        self._cpu: Any = None  # the faiss index on CPU, with search parameters set
        self._faiss: Any = None  # the same on the search device
        self._info: dict[str, Any] = {}  # the manifest's index: kind, nprobe / ef_search, measured recall
        self._augmented: dict[tuple[int, float], GalleryIndex] = {}

    @classmethod
    def from_arrays(
        cls,
        vectors: np.ndarray,
        records: Sequence[ItemRecord] | RecordTable,
        manifest: Manifest | dict[str, Any],
        config: IndexConfig | None = None,
    ) -> GalleryIndex:
        """An index over ``vectors`` (N, D) float32 as they are (a memory map stays one) and their records."""
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise IndexMismatchError(f"expected float32 vectors of shape (N, D), got {vectors.dtype} {vectors.shape}")
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} records")
        index = cls(int(vectors.shape[1]), manifest, config)
        index._vectors, index.records = vectors, RecordTable.of(records)
        return index

    def __len__(self) -> int:
        return len(self.records)

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32, L2-normalised (a read-only memory map once saved or opened); row i: ``records[i]``."""
        return self._vectors

    def add(self, vectors: np.ndarray, records: Sequence[ItemRecord] | RecordTable) -> None:
        """Append vectors (N, D) and their records."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexMismatchError(f"expected vectors of shape (N, {self.dim}), got {vectors.shape}")
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} records")
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self._vectors) else vectors.copy()
        self.records = self.records.concat(records)
        self._cpu = self._faiss = None
        self._info = {}
        self._augmented = {}

    def _cpu_index(self) -> Any:
        if self._cpu is None:
            kind = backend.choose_kind(self.config, len(self))
            self._cpu = backend.build_index(self._vectors, self.config)
            self._info = tuning.tune(self._cpu, self._vectors, kind, self.config)
        return self._cpu

    def _search_index(self) -> Any:
        if self._faiss is None:
            self._faiss = backend.to_search_device(self._cpu_index(), self.config.use_gpu)
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
        index = self._search_index()
        rescore = self.config.rescore if self._info.get("kind") == "ivfpq" else 0
        return backend.search(index, queries, k, self._vectors, rescore)

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

    def save(self, folder: str | Path) -> None:
        """Write the index directory: every file to a staging name first (written, synced), then all renamed
        into place back to back, the manifest (with counts) last: the commit. Readers see the last commit.

        Vectors and records are streamed to disk and hashed on the way, then re-opened as memory maps.
        The file names stay fixed (``vectors.npy``...) so that version-1/2 indexes and tools keep working;
        the short rename burst plus :meth:`load`'s retry is what keeps readers consistent (see there).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss_bytes = backend.serialize(self._cpu_index())
        base = os.path.abspath(folder)
        stored = self.records.with_paths_under(os.getcwd()).with_paths_relative_to(base)
        staged = {name: folder / STAGED.format(name) for name in (VECTORS, ITEMS, FAISS, MANIFEST)}
        digests = {
            VECTORS: write_array(staged[VECTORS], self._vectors),
            ITEMS: write_hashed(staged[ITEMS], stored.write),
        }
        atomic_write_bytes(staged[FAISS], faiss_bytes)
        digests[FAISS] = file_digest(faiss_bytes)
        manifest = self.manifest.committed(
            dim=self.dim,
            count=len(self),
            index={**self._info, "bytes_per_vector": round(len(faiss_bytes) / max(1, len(self)), 2)},
            files=digests,
            relative_paths=len(stored.relative_paths()),
        )
        manifest.write(staged[MANIFEST])
        replace_all((staged[name], folder / name) for name in (VECTORS, ITEMS, FAISS, MANIFEST))
        (folder / LEGACY_ITEMS).unlink(missing_ok=True)  # a version-1 index, now rewritten as version 2
        self.manifest = manifest
        self._vectors = open_vectors(folder / VECTORS)
        self.records = absolute_paths(RecordTable.read(folder / ITEMS), folder, manifest)

    @classmethod
    def load(
        cls, folder: str | Path, config: IndexConfig | None = None, embedder_identity: dict[str, Any] | None = None
    ) -> GalleryIndex:
        """Open a saved index; with ``embedder_identity``, refuse one built by another embedder.

        Readers never wait for a writer and see its last commit: the files are read between two stamps of
        the folder (inode, size, mtime of the manifest and each data file). A save replaces files by rename
        only, so equal stamps mean every file read belongs to one commit; a save that committed meanwhile
        (stamps differ) sends the read round again, against the new manifest. A check that fails on a folder
        that stayed the same is retried for :data:`SETTLE_SECONDS` (a writer paused inside its rename
        burst), then reported as damage.
        """
        folder = Path(folder)
        manifest = Manifest.read(folder)
        if embedder_identity is not None:
            check_identity(manifest.embedder_identity, embedder_identity, where=str(folder))
        settled = time.monotonic() + SETTLE_SECONDS
        error: Exception | None = None
        for _ in range(LOAD_ATTEMPTS):
            before = stamps(folder)
            try:
                index = cls._open(folder, Manifest.read(folder), config)
            except (IndexMismatchError, OSError, RuntimeError) as exc:  # RuntimeError: faiss
                error = exc
            else:
                error = None
            if stamps(folder) != before:
                continue
            if error is None:
                if embedder_identity is not None:  # the commit read may be newer than the manifest checked above
                    check_identity(index.manifest.embedder_identity, embedder_identity, where=str(folder))
                return index
            if time.monotonic() > settled:
                break
            time.sleep(SETTLE_SECONDS / 10)
        if error is None:
            raise IndexMismatchError(f"{folder} kept changing while being opened; try again")
        raise error

    @classmethod
    def _open(cls, folder: Path, manifest: Manifest, config: IndexConfig | None) -> GalleryIndex:
        """The index as ``manifest`` describes it, every file checked against it."""
        if manifest.dim is None or manifest.count is None:
            raise IndexMismatchError(f"{folder}/{MANIFEST} is damaged (no dim or count); {REBUILD}")
        index = cls(manifest.dim, manifest, config)
        verify_file(folder, VECTORS, manifest)
        vectors = open_vectors(folder / VECTORS)
        records = read_records(folder, manifest)
        if len(vectors) != manifest.count or len(records) != manifest.count:
            raise IndexMismatchError(
                f"{folder} is inconsistent: manifest says {manifest.count} items, found {len(vectors)} "
                f"vectors and {len(records)} records (interrupted write?); re-run `carsearch index`"
            )
        if vectors.ndim != 2 or vectors.shape[1] != index.dim:
            raise IndexMismatchError(
                f"{folder}/{VECTORS} has shape {vectors.shape}, expected (N, {index.dim}); {REBUILD}"
            )
        index._vectors, index.records = vectors, absolute_paths(records, folder, manifest)
        if (folder / FAISS).exists():
            verify_file(folder, FAISS, manifest)
            cpu_index = faiss.read_index(str(folder / FAISS))
            if cpu_index.ntotal == len(index) and cpu_index.d == index.dim:
                stored = manifest.index_info
                tuning.apply(cpu_index, stored, index.config)
                index._cpu, index._info = cpu_index, stored
        return index


def stamps(folder: Path) -> list[tuple[int, int, int] | None]:
    """(inode, size, mtime ns) of the manifest and each data file, None where absent: changes with every save."""
    result: list[tuple[int, int, int] | None] = []
    for name in (MANIFEST, VECTORS, ITEMS, FAISS, LEGACY_ITEMS):
        try:
            stat = os.stat(folder / name)
        except FileNotFoundError:
            result.append(None)
        else:
            result.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return result


def file_digest(data: bytes) -> dict[str, Any]:
    """Size and SHA-256 of a file's bytes, as stored in the manifest."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it (enough of a file for pyarrow too)."""

    closed = False

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.sha, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def write_hashed(path: Path, write: Callable[[BinaryIO], None]) -> dict[str, Any]:
    """Write ``path`` atomically through ``write(handle)``, hashing on the way; its digest as in the manifest."""
    writers: list[_HashingWriter] = []

    def hashed(handle: BinaryIO) -> None:
        writers.append(_HashingWriter(handle))
        write(cast(BinaryIO, writers[-1]))  # file-like enough: writers only write, flush and check closed

    atomic_write(path, hashed)
    return {"bytes": writers[-1].size, "sha256": writers[-1].sha.hexdigest()}


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Save ``array`` as float32 .npy atomically, streamed (a memory map is never read whole); its digest."""
    return write_hashed(path, lambda handle: np.save(handle, np.asarray(array, dtype=np.float32), allow_pickle=False))


def open_vectors(path: Path) -> np.ndarray:
    """The (N, D) float32 array of a .npy file as a read-only memory map."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise IndexMismatchError(f"{path} is not a readable vector file ({exc}); {REBUILD}") from None


def verify_file(folder: Path, name: str, manifest: Manifest) -> None:
    """Refuse ``folder/name`` unless it matches the manifest's size and SHA-256, streamed in chunks.

    Files over :data:`VERIFY_MAX_BYTES` are checked for size only, so that opening a 10M-vector index does
    not read 50 GB of vectors; their stored SHA-256 still allows a full offline check (``sha256sum``).
    Indexes written before checksums were stored (no ``files`` in the manifest) are read unchecked.
    """
    path = folder / name
    if not path.exists():
        raise IndexMismatchError(f"{folder} is damaged: {name} is missing; {REBUILD}")
    expected = manifest.digest(name)
    size = path.stat().st_size
    if expected is None or (size == expected.bytes and size > VERIFY_MAX_BYTES):
        if expected is not None:
            logger.info("%s: %d bytes (over %d): size checked, checksum not", path, size, VERIFY_MAX_BYTES)
        return
    sha = hashlib.sha256()
    if size == expected.bytes:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                sha.update(chunk)
    if size != expected.bytes or sha.hexdigest() != expected.sha256:
        raise IndexMismatchError(
            f"{folder} is damaged: {name} ({size} bytes) does not match the size and checksum in {MANIFEST} "
            f"({expected.bytes} bytes): an interrupted copy or a modified file; {REBUILD}"
        )


def read_records(folder: Path, manifest: Manifest) -> RecordTable:
    """The verified records of an index: ``items.arrow`` (version 2) or a version-1 ``items.jsonl``."""
    if manifest.digest(ITEMS) is not None or (folder / ITEMS).exists():
        verify_file(folder, ITEMS, manifest)
        try:
            return RecordTable.read(folder / ITEMS)
        except ValueError as exc:
            raise IndexMismatchError(f"{exc}; {REBUILD}") from None
    if not manifest.has_checksums and not (folder / LEGACY_ITEMS).exists():
        return RecordTable()  # written before records were stored
    verify_file(folder, LEGACY_ITEMS, manifest)
    lines = (folder / LEGACY_ITEMS).read_bytes().decode().splitlines()
    return RecordTable.of(ItemRecord.from_dict(json.loads(line)) for line in lines if line.strip())


def absolute_paths(records: RecordTable, folder: Path, manifest: Manifest) -> RecordTable:
    """``records`` with every local path usable from any working directory.

    An index stores its items' local paths absolute, or relative to the index folder for files inside it
    (:attr:`Manifest.paths_relative_to_index`), so a moved or copied index still finds them. Indexes written
    before stored paths as typed, relative to the folder they were built from: those are resolved against the
    working directory when they exist from it (and saved absolute by the next ``carsearch index``); otherwise
    they stay relative and :func:`unresolved_paths` counts them.
    """
    if manifest.paths_relative_to_index:
        return records.with_paths_under(os.path.abspath(folder)) if manifest.relative_paths else records
    relative = records.relative_paths()
    if not len(relative):
        return records
    first = str(records.table.column("path")[int(relative[0])].as_py())
    if Path(first).exists():
        return records.with_paths_under(os.getcwd())
    logger.warning(
        "%s: %d image paths are relative to the folder the index was built in (e.g. %s) and not found from here; "
        "run `carsearch index SOURCE --out %s` once from that folder to store them absolute",
        folder,
        len(relative),
        first,
        folder,
    )
    return records


def unresolved_paths(records: RecordTable) -> list[str]:
    """Relative paths left in opened records: an older index opened away from the folder it was built in."""
    return [str(records.table.column("path")[int(i)].as_py()) for i in records.relative_paths()]
