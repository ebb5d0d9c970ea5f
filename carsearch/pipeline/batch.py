"""The batch crop-and-index job: decode in worker processes, detect and embed in batches, resume safely."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from carsearch.data.atomic import atomic_write_jsonl, read_jsonl
from carsearch.data.cropping import apply_plan, needs_detector, plan_image, plan_in_original
from carsearch.data.decode import Decoded, DecodeDataset, decode_loader
from carsearch.data.sources import SourceItem
from carsearch.errors import IndexMismatchError
from carsearch.index.gallery import MANIFEST, GalleryIndex, check_identity, read_manifest
from carsearch.index.records import ItemRecord
from carsearch.pipeline.chunks import Chunk, ChunkStore
from carsearch.types import BBox

if TYPE_CHECKING:
    from carsearch.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

ERRORS = "errors.jsonl"
WORK = "work"


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
        return asdict(self)


def _merge(index: GalleryIndex | None, chunks: list[Chunk], dim: int) -> tuple[list[ItemRecord], np.ndarray]:
    """Existing items, then chunk items in order; a newer result for a source key replaces older ones."""
    groups: OrderedDict[str, list[tuple[ItemRecord, np.ndarray]]] = OrderedDict()
    sources: list[list[tuple[ItemRecord, np.ndarray]]] = []
    if index is not None:
        sources.append(list(zip(index.records, index.vectors, strict=True)))
    sources.extend(list(zip(c.records, c.vectors, strict=True)) for c in chunks)
    for source in sources:
        fresh: OrderedDict[str, list[tuple[ItemRecord, np.ndarray]]] = OrderedDict()
        for record, vector in source:
            fresh.setdefault(record.key, []).append((record, vector))
        for key, group in fresh.items():
            groups.pop(key, None)
            groups[key] = group
    pairs = [pair for group in groups.values() for pair in group]
    records = [r for r, _ in pairs]
    vectors = np.stack([v for _, v in pairs]).astype(np.float32) if pairs else np.zeros((0, dim), np.float32)
    return records, vectors


def _merge_errors(old: list[dict[str, Any]], chunks: list[Chunk], indexed: set[str]) -> list[dict[str, Any]]:
    errors: OrderedDict[str, dict[str, Any]] = OrderedDict((e["path"], e) for e in old)
    for chunk in chunks:
        for error in chunk.errors:
            errors.pop(error["path"], None)
            errors[error["path"]] = error
    return [e for path, e in errors.items() if path not in indexed]


def check_resumable(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to continue an index in ``out`` that was built with other settings."""
    if not (out / MANIFEST).exists():
        return
    stored = read_manifest(out)
    # The embedder is its weights' fingerprint (+ spec, dim), not the checkpoint's path: a moved file is the same.
    check_identity(stored.get("embedder", {}), manifest.get("embedder", {}), where=str(out))
    if stored.get("processing") != manifest.get("processing"):
        raise IndexMismatchError(
            f"{out} holds an index built with different processing settings; choose another --out, or delete "
            f"{out} to rebuild (stored: {stored.get('processing')}, now: {manifest.get('processing')})"
        )


def run_index_job(
    pipeline: Pipeline, items: list[SourceItem], out: str | Path, progress: bool = False, prune: bool = False
) -> IndexReport:
    """Index ``items`` into the directory ``out``; re-running continues where a killed run stopped.

    ``prune``: also drop indexed images that ``items`` no longer lists (deleted or moved files).
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = pipeline.config
    embedder = pipeline.embedder
    manifest = pipeline.manifest()
    check_resumable(out, manifest)
    existing = GalleryIndex.load(out, config.index) if (out / MANIFEST).exists() else None
    store = ChunkStore(out / WORK)
    earlier = store.read_all()
    done: dict[str, str] = {}
    for record in existing.records if existing else []:
        done[record.key] = record.content_hash
    for chunk in earlier:
        for record in chunk.records:
            done[record.key] = record.content_hash

    seen: set[str] = set()
    unique: list[SourceItem] = []
    for item in items:
        if str(item.path) not in seen:
            seen.add(str(item.path))
            unique.append(item)
    if len(unique) < len(items):
        logger.warning("%d duplicate paths in the source were ignored", len(items) - len(unique))

    batch_size = config.runtime.batch_size
    loader = decode_loader(
        DecodeDataset(unique, done, config.runtime.max_image_side), batch_size, config.runtime.workers
    )
    bar = _progress(len(unique), progress)
    counts = {"processed": 0, "skipped": 0, "errors": 0, "added": 0, "replaced": 0, "items": 0, "no_detection": 0}
    indexed = set(done)  # paths the index (or a killed run's chunks) already holds
    timings = {"detect": 0.0, "embed": 0.0}
    chunk = Chunk()
    try:
        for batch in loader:
            _process_batch(pipeline, batch, chunk, counts, timings, indexed)
            if chunk.images >= config.runtime.checkpoint_every:
                store.write(chunk, embedder.dim)
                chunk = Chunk()
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(errors=counts["errors"], skipped=counts["skipped"], refresh=False)
    finally:
        if chunk:
            store.write(chunk, embedder.dim)  # keep finished work even when interrupted
        if bar is not None:
            bar.close()

    chunks = store.read_all()
    records, vectors = _merge(existing, chunks, embedder.dim)
    pruned = 0
    if prune:
        listed = {str(item.path) for item in unique}
        stale = {r.path for r in records if r.path not in listed}
        keep = [i for i, r in enumerate(records) if r.path in listed]
        records, vectors, pruned = [records[i] for i in keep], vectors[keep], len(stale)
        if stale:
            logger.info("pruned %d images the source no longer lists", pruned)
    index = GalleryIndex(embedder.dim, manifest, config.index)
    if len(records):
        index.add(vectors, records)
    errors = _merge_errors(read_jsonl(out / ERRORS), chunks, {r.key for r in records})
    if prune:
        errors = [e for e in errors if e["path"] in listed]
    atomic_write_jsonl(out / ERRORS, errors)
    index.save(out)
    store.clear()
    seconds = time.perf_counter() - start
    return IndexReport(
        out=str(out),
        total=len(unique),
        processed=counts["processed"],
        skipped=counts["skipped"],
        errors=counts["errors"],
        added=counts["added"],
        replaced=counts["replaced"],
        pruned=pruned,
        items_added=counts["items"],
        items_in_index=len(index),
        no_detection=counts["no_detection"],
        seconds=round(seconds, 3),
        images_per_second=round(counts["processed"] / seconds, 2) if seconds > 0 else 0.0,
        detect_seconds=round(timings["detect"], 3),
        embed_seconds=round(timings["embed"], 3),
    )


def _process_batch(
    pipeline: Pipeline,
    batch: list[Decoded],
    chunk: Chunk,
    counts: dict[str, int],
    timings: dict[str, float],
    indexed: set[str],
) -> None:
    config = pipeline.config
    good: list[tuple[Decoded, Image.Image, BBox | None]] = []
    for entry in batch:
        if entry.status == "skip":
            counts["skipped"] += 1
        elif entry.status == "error":
            counts["errors"] += 1
            chunk.images += 1
            chunk.errors.append(
                {"path": str(entry.item.path), "reason": entry.reason, "content_hash": entry.content_hash}
            )
        else:
            gt = entry.item.box.scale(entry.scale) if entry.item.box is not None else None
            good.append((entry, Image.fromarray(entry.image), gt))
    if not good:
        return
    to_detect = [i for i, (_, _, gt) in enumerate(good) if needs_detector(config, gt)]
    detections: dict[int, list] = {}
    if to_detect:
        tic = time.perf_counter()
        found = pipeline.detector.detect([good[i][1] for i in to_detect])
        timings["detect"] += time.perf_counter() - tic
        detections = dict(zip(to_detect, found, strict=True))
    crops: list[Image.Image] = []
    pending: list[ItemRecord] = []
    for i, (entry, image, gt) in enumerate(good):
        plans = plan_image(config, image.width, image.height, detections.get(i), gt)
        for crop_index, plan in enumerate(plans):
            crops.append(apply_plan(image, plan))
            original = plan_in_original(plan, entry.scale)
            flags = list(original.flags)
            box = original.region.as_list() if original.region is not None else None
            pending.append(
                ItemRecord(
                    path=str(entry.item.path),
                    label=entry.item.label,
                    content_hash=entry.content_hash or "",
                    box=box,
                    det_score=round(plan.detection.score, 4) if plan.detection else None,
                    det_class=plan.detection.class_name if plan.detection else None,
                    flags=flags,
                    image_size=list(entry.original_size) if entry.original_size else None,
                    crop_index=crop_index,
                )
            )
            counts["no_detection"] += "no_detection" in plan.flags
    tic = time.perf_counter()
    vectors = pipeline.embedder.embed(crops)
    timings["embed"] += time.perf_counter() - tic
    chunk.records.extend(pending)
    chunk.vectors.extend(vectors)
    chunk.images += len(good)
    counts["processed"] += len(good)
    counts["replaced"] += sum(str(entry.item.path) in indexed for entry, _, _ in good)
    counts["added"] = counts["processed"] - counts["replaced"]
    counts["items"] += len(pending)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True, smoothing=0.1)
