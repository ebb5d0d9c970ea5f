"""The batch crop-and-index job, whatever engine runs it: resume safely, count, write chunks, merge, save.

:class:`IndexJob` holds what every engine shares (resume state, counting, chunks, merge, atomic save);
``local_engine`` runs it in this process, ``ray_engine`` on Ray Data."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from carsearch.data import storage
from carsearch.data.atomic import atomic_write_jsonl, read_jsonl
from carsearch.data.lock import WriterLock
from carsearch.data.sources import SourceItem
from carsearch.detector.weights import BUNDLE_DIR, WeightsRecord, bundle, describe, local_target, sha256_file
from carsearch.errors import ConfigError, IndexMismatchError
from carsearch.index.gallery import GalleryIndex, unresolved_paths
from carsearch.index.manifest import MANIFEST, Manifest, check_identity
from carsearch.index.records import RecordTable
from carsearch.pipeline.chunks import Chunk, ChunkMeta, ChunkStore
from carsearch.pipeline.loaded_models import Models
from carsearch.pipeline.outcomes import Outcome
from carsearch.runtime.progress import progress_bar
from carsearch.types import FLAG_NO_DETECTION

logger = logging.getLogger(__name__)

ERRORS = "errors.jsonl"
WORK = "work"
MERGED = "merged-vectors.npy"  # in WORK while the merge runs


@dataclass(frozen=True)
class IndexReport:
    """What a batch job did, in images: ``processed`` = ``added`` (new to the index) + ``replaced`` (content
    changed since it was indexed); ``skipped`` = kept as indexed (same content); ``pruned``: dropped because
    the source no longer lists them (``--prune`` only). ``items_added``: index items made (one per image, or
    one per car with ``detector.selection=all``)."""

    out: str
    total: int
    processed: int
    skipped: int
    errors: int
    added: int
    replaced: int
    pruned: int
    items_added: int
    items_in_index: int
    no_detection: int
    seconds: float
    images_per_second: float
    detect_seconds: float
    embed_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: every field under its own name."""
        return asdict(self)


def merge_order(tables: list[RecordTable], keep: set[str] | None = None) -> tuple[np.ndarray, int]:
    """Rows to keep from ``tables`` stacked end to end (the index's, then each chunk's), in merged order.

    A source key's newest group of rows replaces older ones and takes the newer position; with ``keep``,
    keys outside it are dropped (pruning). Returns the row numbers and how many distinct keys were dropped.
    Works on the key column and row numbers only, never on record objects or vectors.
    """
    groups: OrderedDict[str, list[int]] = OrderedDict()
    offset = 0
    for table in tables:
        fresh: OrderedDict[str, list[int]] = OrderedDict()
        for row, key in enumerate(table.column("path"), start=offset):  # ItemRecord.key is its path
            fresh.setdefault(key, []).append(row)
        for key, rows in fresh.items():
            groups.pop(key, None)
            groups[key] = rows
        offset += len(table)
    dropped = [key for key in groups if keep is not None and key not in keep]
    for key in dropped:
        del groups[key]
    return np.fromiter((row for rows in groups.values() for row in rows), dtype=np.int64), len(dropped)


def gather_rows(parts: list[tuple[int, Callable[[], np.ndarray]]], ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (len(ids), D) with rows ``ids`` of the parts stacked end to end.

    ``parts``: (row count, loader) pairs; a part is loaded only if a row of it is wanted, one part at a time,
    and read front to back, so ``out`` may be a memory map and peak RAM is one part (an index's own vectors
    are already a memory map).
    """
    start = 0
    for length, load in parts:
        inside = np.flatnonzero((ids >= start) & (ids < start + length))
        if len(inside):
            local = ids[inside] - start
            order = np.argsort(local, kind="stable")
            out[inside[order]] = load()[local[order]]
        start += length
    return out


def merged_vectors(path: Path, rows: int, dim: int) -> np.ndarray:
    """A writable float32 (rows, dim) array for the merge: a .npy memory map at ``path`` (in RAM if empty)."""
    if rows == 0:
        return np.zeros((0, dim), np.float32)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))


def _merge_errors(old: list[dict[str, Any]], chunks: list[ChunkMeta], indexed: set[str]) -> list[dict[str, Any]]:
    errors: OrderedDict[str, dict[str, Any]] = OrderedDict((e["path"], e) for e in old)
    for chunk in chunks:
        for error in chunk.errors:
            errors.pop(error["path"], None)
            errors[error["path"]] = error
    return [e for path, e in errors.items() if path not in indexed]


def check_resumable(out: Path, manifest: Manifest) -> None:
    """Refuse to continue an index in ``out`` that was built with other settings."""
    if not (out / MANIFEST).exists():
        return
    stored = Manifest.read(out)
    # The embedder is its weights' fingerprint (+ spec, dim), not the checkpoint's path: a moved file is the same.
    check_identity(stored.embedder_identity, manifest.embedder_identity, where=str(out))
    adopt_weights_name(stored, manifest)
    if stored.processing != manifest.processing:
        key, was, now = first_difference(stored.processing, manifest.processing)
        raise IndexMismatchError(
            f"{out} was built with {key}={was!r}, this run has {now!r}: re-run without that setting to add to the "
            f"index with its own settings, or choose another --out (or delete {out}) for a new index"
        )


def adopt_weights_name(stored: Manifest, manifest: Manifest) -> None:
    """A detector file with the bytes the index recorded (``detector_weights``) is the index's detector under
    another name: ``manifest`` takes the index's name for it, so the settings compare equal."""
    weights = Path(str(manifest.configured_detector_weights or ""))
    if not (stored.detector_weights and manifest.crop_detector and stored.crop_detector):
        return
    if storage.is_uri(str(weights)) or not weights.is_file():
        return
    record = WeightsRecord.from_dict(stored.detector_weights)
    if weights.stat().st_size == record.bytes and sha256_file(weights) == record.sha256:
        manifest.detector_name = stored.detector_name


def first_difference(stored: Any, now: Any, prefix: str = "") -> tuple[str, Any, Any]:
    """The first dotted key where two nested settings dicts differ, and both values (None where absent)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in sorted(set(stored) | set(now)):
            if stored.get(key) != now.get(key):
                return first_difference(stored.get(key), now.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "settings", stored, now


def absolute_items(items: list[SourceItem], out: Path | None = None) -> list[SourceItem]:
    """``items`` with local paths absolute (an index never depends on the folder it was built from), less the
    index's own files when the index folder ``out`` sits inside the source (its top-level files, ``work/``,
    ``detector/``; images in other sub-folders of ``out`` are indexed like any)."""
    own = os.path.abspath(out) if out is not None else None
    kept = []
    for item in items:
        if not storage.is_uri(item.path):
            path = os.path.abspath(Path(item.path).expanduser())
            relative = os.path.relpath(path, own) if own is not None else ".."
            if not relative.startswith("..") and (
                os.sep not in relative or relative.startswith((f"{WORK}{os.sep}", f"{BUNDLE_DIR}{os.sep}"))
            ):
                continue
            item = replace(item, path=Path(path))
        kept.append(item)
    return kept


def record_detector(manifest: Manifest, models: Models, out: Path, existing: GalleryIndex | None) -> None:
    """Record the detector weights that made the index's crops (``detector_weights``: name, SHA-256, source)
    and copy small files into the index folder. The file is the loaded detector's, else (the Ray engine
    detects in its actors; a run with nothing new never loads it) the index's own record, else the configured
    weights resolved as the detector resolves them. The first recorded source is kept while the bytes match."""
    if not models.config.crop:
        return
    configured = models.config.detector.weights
    loaded = getattr(models.detector, "weights_file", None) if models.detector_loaded else None
    stored = existing.manifest.detector_weights if existing is not None else None
    if loaded is None and stored:
        record = stored  # as recorded, keys and all
    else:
        local = loaded or _local_weights(configured)
        if local is None:
            return
        fresh = describe(local, configured)
        previous = WeightsRecord.from_dict(stored) if stored else None
        if previous is not None and previous.sha256 == fresh.sha256:
            fresh = replace(fresh, source=previous.source)
        record = bundle(fresh, local, out).to_dict()
    manifest.record_detector_weights(record)


def _local_weights(weights: str) -> Path | None:
    """The local file the detector would load for ``weights`` (a URI's cached copy), if there is one."""
    try:
        local = storage.local_copy(weights) if storage.is_uri(weights) else Path(local_target(weights)).expanduser()
    except OSError:
        return None
    return local if local.is_file() else None


class IndexJob:
    """One run of the batch job over an index directory, whatever engine produces the outcomes.

    Opening it takes the folder's writer lock (one writer at a time: a second job is refused with
    :class:`~carsearch.errors.IndexBusyError`), checks that ``out`` may be continued and collects what is
    already done (the index and a killed run's chunks); :meth:`record` takes outcomes in source order and
    writes a chunk every ``runtime.checkpoint_every`` images; :meth:`finish` merges everything, saves the
    index atomically and releases the lock. Engines call :meth:`release` in ``finally``.
    """

    def __init__(
        self,
        models: Models,
        items: list[SourceItem],
        out: str | Path,
        progress: bool = False,
        chunk_format: str = "npz",
    ) -> None:
        self.start = time.perf_counter()
        self.models = models
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"--out {self.out} is a file, not an index folder; choose another --out") from None
        self.lock = WriterLock(self.out).acquire()  # before reading any state; until finish() or release()
        try:
            self._open(items, progress, chunk_format)
        except BaseException:
            self.lock.release()  # a job that cannot open lets the next writer in at once
            raise

    def _open(self, items: list[SourceItem], progress: bool, chunk_format: str) -> None:
        """Check that ``out`` may be continued and collect what it already holds (under the lock)."""
        models = self.models
        self.manifest = models.manifest()
        check_resumable(self.out, self.manifest)
        self.existing = GalleryIndex.load(self.out, models.config.index) if (self.out / MANIFEST).exists() else None
        if self.existing is not None and (unresolved := unresolved_paths(self.existing.records)):
            raise IndexMismatchError(
                f"{self.out} was written by an older carsearch with image paths relative to the folder it was built "
                f"in (e.g. {unresolved[0]}); run this command once from that folder to store them absolute"
            )
        self.store = ChunkStore(self.out / WORK, chunk_format)
        self.done: dict[str, str] = {}  # path -> content hash of what the index (or a killed run) holds
        if self.existing is not None:
            records = self.existing.records
            self.done.update(zip(records.column("path"), records.column("content_hash"), strict=True))
        for path in self.store.paths():
            records = self.store.read_meta(path).records
            self.done.update(zip(records.column("path"), records.column("content_hash"), strict=True))
        seen: set[str] = set()
        self.items: list[SourceItem] = []
        listed = absolute_items(items, self.out)
        for item in listed:
            if str(item.path) not in seen:
                seen.add(str(item.path))
                self.items.append(item)
        if len(self.items) < len(listed):
            logger.warning("%d duplicate paths in the source were ignored", len(listed) - len(self.items))
        self.counts = dict.fromkeys(("processed", "skipped", "errors", "replaced", "items", "no_detection"), 0)
        self.timings = {"detect": 0.0, "embed": 0.0}
        self.chunk = Chunk()
        self.bar = progress_bar(len(self.items), progress, "indexing")

    def record(self, outcomes: list[Outcome]) -> None:
        """Count a batch of images' outcomes and keep their items (or errors) for the next chunk, which is
        written once it holds ``runtime.checkpoint_every`` images (at batch boundaries)."""
        counts = self.counts
        for outcome in outcomes:
            if outcome.status == "skip":
                counts["skipped"] += 1
            elif outcome.status == "error":
                counts["errors"] += 1
                self.chunk.images += 1
                self.chunk.errors.append(outcome.error or {"path": outcome.path, "reason": "unknown"})
            else:
                if outcome.vectors is None or len(outcome.vectors) != len(outcome.records):
                    raise ValueError(f"{outcome.path}: {len(outcome.records)} records without their vectors")
                self.chunk.images += 1
                self.chunk.records.extend(outcome.records)
                self.chunk.vectors.extend(outcome.vectors)
                counts["processed"] += 1
                counts["replaced"] += outcome.path in self.done
                counts["items"] += len(outcome.records)
                counts["no_detection"] += sum(FLAG_NO_DETECTION in r.flags for r in outcome.records)
        if self.chunk.images >= self.models.config.runtime.checkpoint_every:
            self.flush()
        if self.bar is not None:
            self.bar.update(len(outcomes))
            self.bar.set_postfix(errors=counts["errors"], skipped=counts["skipped"], refresh=False)

    def flush(self) -> None:
        """Write the pending chunk (atomically), e.g. before stopping."""
        if self.chunk:
            self.store.write(self.chunk, self.models.embedder.dim)
            self.chunk = Chunk()

    def close(self) -> None:
        """Keep finished work even when interrupted: flush and close the progress bar."""
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def release(self) -> None:
        """:meth:`close`, then let the next writer in (idempotent; engines call it in ``finally``)."""
        try:
            self.close()
        finally:
            self.lock.release()

    def finish(self, prune: bool = False) -> IndexReport:
        """Merge the index with this run's chunks, save it atomically, clear the chunks; the run's report.

        The merged vectors go through a memory map in ``work/`` (RAM holds one chunk's vectors at a time),
        the records through Arrow columns.
        """
        self.close()
        dim = self.models.embedder.dim
        chunks = [self.store.read_meta(path) for path in self.store.paths()]
        existing = self.existing
        tables = ([existing.records] if existing is not None else []) + [c.records for c in chunks]
        parts = [(len(existing), lambda: existing.vectors)] if existing is not None else []
        parts += [(len(c.records), functools.partial(self.store.read_vectors, c.path)) for c in chunks]
        listed = {str(item.path) for item in self.items}
        ids, pruned = merge_order(tables, keep=listed if prune else None)
        if pruned:
            logger.info("pruned %d images the source no longer lists", pruned)
        records = RecordTable.concatenate(tables).take(ids)
        merged = self.out / WORK / MERGED
        try:  # the merge file is as large as the index: never left behind, also when saving fails (disk full)
            vectors = gather_rows(parts, ids, merged_vectors(merged, len(ids), dim))
            record_detector(self.manifest, self.models, self.out, existing)
            index = GalleryIndex.from_arrays(vectors, records, self.manifest, self.models.config.index)
            errors = _merge_errors(read_jsonl(self.out / ERRORS), chunks, set(records.column("path")))
            if prune:
                errors = [e for e in errors if e["path"] in listed]
            atomic_write_jsonl(self.out / ERRORS, errors)
            index.save(self.out)
            del vectors
        finally:
            merged.unlink(missing_ok=True)
        self.store.clear()
        self.lock.release()
        seconds = time.perf_counter() - self.start
        counts = self.counts
        return IndexReport(
            out=str(self.out),
            total=len(self.items),
            processed=counts["processed"],
            skipped=counts["skipped"],
            errors=counts["errors"],
            added=counts["processed"] - counts["replaced"],
            replaced=counts["replaced"],
            pruned=pruned,
            items_added=counts["items"],
            items_in_index=len(index),
            no_detection=counts["no_detection"],
            seconds=round(seconds, 3),
            images_per_second=round(counts["processed"] / seconds, 2) if seconds > 0 else 0.0,
            detect_seconds=round(self.timings["detect"], 3),
            embed_seconds=round(self.timings["embed"], 3),
        )
