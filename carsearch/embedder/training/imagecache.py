"""Pre-resized uint8 crops in a memory-mapped ``.npy`` file, keyed by file content and preprocessing.

Training epochs then read pixels instead of decoding and cropping JPEGs: one build per data set, crop
mode and size, shared by later epochs, runs and DataLoader workers (the memory map is shared, not copied).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch.utils.data import DataLoader, Dataset

from carsearch.data import storage
from carsearch.data.atomic import atomic_write_json
from carsearch.data.digest import json_stream_digest
from carsearch.data.images import content_hash
from carsearch.data.processes import die_with_parent
from carsearch.embedder.preprocessing import Size
from carsearch.embedder.training.data import CropDataset
from carsearch.errors import ImageLoadError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_key(dataset: CropDataset, size: Size, preprocessing: str) -> str:
    """Digest of everything that decides the cached pixels: file contents, boxes, crop mode, size, resizing."""
    cropping = repr(dataset.crop.detector) if dataset.mode != "raw" else None

    def entries() -> Iterator[list[Any]]:
        yield [CACHE_VERSION, list(size), preprocessing, dataset.mode, cropping]
        for i, item in enumerate(dataset.items):
            data = storage.read_bytes_or_empty(item.path)
            boxes = [d.box.as_list() for d in dataset.detections[i]] if dataset.detections is not None else None
            box = item.box.as_list() if item.box is not None else None
            yield [storage.identity(item.path), content_hash(data), box, boxes]

    return json_stream_digest(entries(), size=10)


def _safe_item(dataset: CropDataset, index: int) -> tuple[int, np.ndarray | None, str]:
    try:
        return index, dataset[index][0].numpy(), ""
    except ImageLoadError as exc:
        return index, None, str(exc)


class _Items:
    """A map-style view of ``dataset`` whose unreadable images come back as ``None`` with the reason."""

    def __init__(self, dataset: CropDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        return _safe_item(self.dataset, index)


def _fill(dataset: CropDataset, out: np.ndarray, workers: int) -> list[int]:
    """Write the readable crops of ``dataset`` into ``out`` in order; returns their item indices."""
    kept: list[int] = []
    # torch's stub wants a Dataset subclass; any map-style object works
    items = cast("Dataset[tuple[int, np.ndarray | None, str]]", _Items(dataset))
    for index, pixels, error in DataLoader(
        items, batch_size=None, num_workers=workers, worker_init_fn=die_with_parent() if workers else None
    ):
        if pixels is None:
            logger.warning("skipping unreadable training image %s: %s", dataset.items[index].path, error)
            continue
        out[len(kept)] = pixels
        kept.append(int(index))
    return kept


def cached_crops(
    dataset: CropDataset, size: Size, preprocessing: str, cache_dir: str | Path | None, workers: int = 0
) -> tuple[np.ndarray, list[int]]:
    """``(images (M, 3, h, w) uint8; indices of the M readable items)`` for ``size`` = (h, w).

    ``dataset`` must yield uint8 (3, h, w) tensors (see ``data.geometry_transform``); ``preprocessing``
    names its resizing (it is part of the key). Unreadable images are skipped with a warning, never fatal.
    With ``cache_dir`` the images are a read-only memory map of a file written under a temporary name and
    renamed (an interrupted build leaves no cache behind) and found again by later runs; without, an array.
    """
    shape = (len(dataset), 3, *size)
    if cache_dir is None:
        images = np.empty(shape, dtype=np.uint8)
        kept = _fill(dataset, images, workers)
        return images[: len(kept)], kept
    cache_dir = Path(cache_dir)
    key = cache_key(dataset, size, preprocessing)
    array_path, index_path = (cache_dir / f"images_{size[0]}x{size[1]}_{key}{ext}" for ext in (".npy", ".json"))
    if array_path.exists() and index_path.exists():
        kept = json.loads(index_path.read_text())["kept"]
        images = np.load(array_path, mmap_mode="r")
        if images.shape == (len(kept), 3, *size):
            return images, kept
        logger.warning("image cache %s does not match its index; rebuilding", array_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("caching %d crops at %dx%d px in %s", len(dataset), *size, array_path)
    tmp = array_path.with_suffix(f".tmp{os.getpid()}.npy")
    try:
        full = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        kept = _fill(dataset, full, workers)
        if len(kept) < len(dataset):  # rewrite with the readable images only
            compact = np.array(full[: len(kept)])
            del full
            np.save(tmp, compact)
        else:
            full.flush()
            del full
        atomic_write_json(index_path, {"version": CACHE_VERSION, "kept": kept, "size": list(size)})
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(array_path, mmap_mode="r"), kept
