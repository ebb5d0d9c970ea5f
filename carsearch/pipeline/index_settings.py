"""An existing index's settings, usable from any folder: for queries, and for adding images to it.

Rules:
- An index's config is its manifest's, with its files located from here: the detector weights from the copy
  inside the index (or their recorded source while it holds the same bytes); an older index's relative
  paths against the working directory when they exist from it.
- Adding to an index (``carsearch index SRC --out INDEX`` again) starts from that config, so a plain re-run
  needs no flags. A setting given explicitly (a flag, ``--set`` or ``--config``) that would change how the
  index's vectors are made is refused in one line naming it; the others (threads, batch sizes, search
  settings) apply to this run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from carsearch.config import (
    PipelineConfig,
    apply_overrides,
    from_dict,
    resolve_config,
    resolve_paths,
    upgrade_config,
)
from carsearch.data import storage
from carsearch.detector.weights import WeightsRecord, locate, sha256_file
from carsearch.errors import IndexMismatchError
from carsearch.index import read_manifest

# Settings that change the vectors an index holds: detector, crop mode and geometry, embedder input and model.
VECTOR_SETTINGS = ("detector.", "crop", "crop_source", "runtime.max_image_side", "embedder.")
RUN_SETTINGS = ("embedder.batch_size", "embedder.runtime", "embedder.channels_last")  # speed only
FLAGS = {
    "detector.weights": "--detector-weights",
    "embedder.model": "--model",
    "embedder.flip": "--flip",
    "crop": "--raw",
    "crop_source": "--crop-source",
}


def stored_config(index_dir: str | Path) -> dict[str, Any]:
    """The config an index was built with (its manifest's, upgraded), its files located from here."""
    manifest = read_manifest(index_dir)
    data = upgrade_config(manifest["config"])
    detector = dict(data.get("detector") or {})
    record = manifest.get("detector_weights")
    if record:
        found = locate(WeightsRecord.from_dict(record), Path(index_dir))
        detector["weights"] = found or detector.get("weights")
    elif detector.get("weights"):
        detector["weights"] = _from_here(str(detector["weights"]))
    embedder = dict(data.get("embedder") or {})
    if embedder.get("model"):
        embedder["model"] = _from_here(str(embedder["model"]))
    return {**data, "detector": detector, "embedder": embedder}


def _from_here(value: str) -> str:
    """An older manifest's path, typed relative to the folder it was built from: absolute if it exists here."""
    if storage.is_uri(value) or "/" not in value or Path(value).is_absolute() or not Path(value).exists():
        return value
    return os.path.abspath(value)


def index_config(index_dir: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The index's own config (:func:`stored_config`) with ``section.key=value`` overrides on top."""
    return from_dict(PipelineConfig, apply_overrides(stored_config(index_dir), overrides or []))


def update_config(
    index_dir: str | Path, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """The config to add images to the existing index at ``index_dir``: its own, then ``config_file``'s keys
    and ``overrides``; refuses (:class:`IndexMismatchError`) an explicit key that changes its vectors."""
    stored = stored_config(index_dir)
    from_file: dict[str, Any] = {}
    if config_file is not None:
        file = resolve_config(config_file)
        from_file = resolve_paths(yaml.safe_load(file.read_text()) or {}, file.parent)
    merged = apply_overrides(_merge(stored, from_file), overrides or [])
    config = from_dict(PipelineConfig, merged)
    asked = {*_flatten(from_file), *(item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item)}
    for key in sorted(asked):
        if _changes_vectors(key) and not _same(key, _get(stored, key), _get(merged, key)):
            flag = FLAGS.get(key, f"--set {key}")
            raise IndexMismatchError(
                f"{flag}: {index_dir} was built with {key}={_show(key, _get(stored, key))}; leave the flag out to "
                f"add to the index with its own settings, or choose another --out for a new index"
            )
    return config


def _changes_vectors(key: str) -> bool:
    return key.startswith(VECTOR_SETTINGS) and key not in RUN_SETTINGS


def _same(key: str, stored: Any, asked: Any) -> bool:
    """Equal settings; weights files compare by content (a moved or renamed copy is the same detector), and
    the embedder by the identity check of the index job (a moved checkpoint is the same model)."""
    if key == "embedder.model":
        return True
    if key == "detector.weights" and stored and asked:
        stored_path, asked_path = Path(str(stored)), Path(str(asked)).expanduser()
        if stored_path.is_file() and asked_path.is_file():
            return sha256_file(stored_path) == sha256_file(asked_path)
        return storage.name(str(stored)) == storage.name(str(asked))
    return bool(stored == asked)


def _show(key: str, value: Any) -> str:
    return storage.name(str(value)) if key == "detector.weights" and value else repr(value)


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
