"""Detector boxes for training images, cached in a JSON file keyed by path + content hash.

Detection runs once per image and detector setting: later epochs, runs and DDP ranks read the cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from carsearch.config import DetectorConfig
from carsearch.data import storage
from carsearch.data.atomic import atomic_write_json
from carsearch.data.digest import json_digest
from carsearch.data.images import content_hash, decode_image
from carsearch.data.sources import SourceItem
from carsearch.types import Detection

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_path(cache_dir: str | Path, config: DetectorConfig) -> Path:
    """The cache file of one detector setting (weights file + what changes its output), in ``cache_dir``."""
    weights = storage.as_location(config.weights)
    digest = json_digest(
        [
            str(weights if storage.is_uri(weights) else Path(weights).expanduser()),
            storage.stamp(weights),
            sorted(config.classes),
            config.detection_floor,
            config.iou,
            config.image_size,
            config.max_detections,
            config.enlarge_small,
        ]
    )
    stem = Path(storage.name(weights)).stem
    return Path(cache_dir) / f"boxes_{stem}_{digest}.json"


def read_cache(path: str | Path) -> dict[str, list[Detection]]:
    """``{"<path>|<content hash>": detections}``; a missing or stale-format file is empty."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable box cache %s: %s", path, exc)
        return {}
    if payload.get("version") != CACHE_VERSION:
        return {}
    return {key: [Detection.from_row(row) for row in rows] for key, rows in payload.get("boxes", {}).items()}


def detect_cached(
    items: Sequence[SourceItem],
    config: DetectorConfig,
    cache_file: str | Path,
    device: str = "cpu",
    batch_size: int = 16,
) -> list[list[Detection]]:
    """The detector's boxes for every item (in its full-resolution pixels), detecting only uncached images.

    Unreadable images get no boxes (their crop falls back to the whole image, flagged like the pipeline).
    """
    cache = read_cache(cache_file)
    keys: list[str] = []
    todo: dict[str, bytes] = {}
    for item in items:
        data = storage.read_bytes_or_empty(item.path)
        key = f"{storage.identity(item.path)}|{content_hash(data)}"
        keys.append(key)
        if key not in cache and data:
            todo[key] = data
    if todo:
        from carsearch.detector import VehicleDetector  # imports ultralytics: only when something is missing

        logger.info("detecting vehicles in %d of %d training images (cache: %s)", len(todo), len(items), cache_file)
        detector = VehicleDetector(config, device=device)
        pending = list(todo.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            images, chunk_keys = [], []
            for key, data in chunk:
                try:
                    images.append(decode_image(data))
                    chunk_keys.append(key)
                except Exception as exc:  # noqa: BLE001 - a bad file must not stop the others
                    logger.warning("cannot decode %s for detection: %s", key.rsplit("|", 1)[0], exc)
                    cache[key] = []
            for key, found in zip(chunk_keys, detector.detect(images), strict=True):
                cache[key] = [Detection.from_row(d.to_row()) for d in found]  # as a later run reads it back (rounded)
        atomic_write_json(
            cache_file,
            {
                "version": CACHE_VERSION,
                "detector": detector.identity,
                "boxes": {k: [d.to_row() for d in v] for k, v in cache.items()},
            },
        )
    return [cache.get(key, []) for key in keys]
