"""Parallel decoding for batch jobs: a map-style dataset whose torch ``DataLoader`` workers read, hash and
decode files. Importing this module does not import torch (Ray's decode tasks use :func:`decode_item` only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from carsearch.data import storage
from carsearch.data.images import content_hash, decode_image, limit_size
from carsearch.data.processes import die_with_parent
from carsearch.data.sources import SourceItem
from carsearch.errors import ImageLoadError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset


@dataclass
class Decoded:
    """A decoded input: ``image`` (H, W, 3) uint8 RGB at ``scale`` × original size, or a skip/error."""

    position: int
    item: SourceItem
    content_hash: str | None
    status: str  # "ok" | "skip" | "error"
    reason: str = ""
    image: np.ndarray | None = None
    scale: float = 1.0
    original_size: tuple[int, int] | None = None  # (width, height)


class DecodeDataset:
    """Map-style dataset: reads item ``i``; skips it when ``done[path] == content hash`` (already indexed)."""

    def __init__(self, items: list[SourceItem], done: dict[str, str], max_side: int) -> None:
        self.items = items
        self.done = done
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> Decoded:
        return decode_item(position, self.items[position], self.done, self.max_side)


def decode_item(position: int, item: SourceItem, done: dict[str, str], max_side: int) -> Decoded:
    """Read, hash and decode one input; ``skip`` when ``done[path]`` equals its content hash, ``error`` with
    a reason when it cannot be read or decoded, or is no image (``item.skip_reason``; never raises for bad files)."""
    if item.skip_reason is not None:
        return Decoded(position, item, None, "error", item.skip_reason)
    try:
        data = storage.read_bytes(item.path)
    except OSError as exc:
        return Decoded(position, item, None, "error", f"cannot read file: {storage.read_failure(exc)}")
    digest = content_hash(data)
    if done.get(str(item.path)) == digest:
        return Decoded(position, item, digest, "skip")
    try:
        image = decode_image(data)
    except ImageLoadError as exc:
        return Decoded(position, item, digest, "error", str(exc))
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the batch
        return Decoded(position, item, digest, "error", f"decoder failed: {type(exc).__name__}: {exc}")
    original = image.size
    image, scale = limit_size(image, max_side)
    return Decoded(position, item, digest, "ok", image=np.asarray(image), scale=scale, original_size=original)


def _as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def decode_loader(dataset: DecodeDataset, batch_size: int, workers: int) -> DataLoader:
    """Batches of :class:`Decoded` in input order, decoded by ``workers`` processes (0 = in-process)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        cast("Dataset[Decoded]", dataset),  # torch's stub wants a Dataset subclass; any map-style object works
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=die_with_parent() if workers else None,
    )
