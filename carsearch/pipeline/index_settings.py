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

from carsearch.config import PipelineConfig
from carsearch.config_files import apply_overrides, from_dict, read_config_file
from carsearch.data import storage
from carsearch.detector.weights import BUNDLE_DIR, WeightsRecord, locate, sha256_file
from carsearch.errors import IndexMismatchError
from carsearch.index.manifest import MANIFEST, REBUILD, Manifest
from carsearch.pipeline.index_job import adopt_weights_name, first_difference
from carsearch.pipeline.loaded_models import processing_of

# Embedder input settings a flag may change: refused on a re-run when given explicitly and different.
EMBEDDER_INPUT = ("embedder.image_size", "embedder.image_width", "embedder.resize", "embedder.flip")
FLAGS = {
    "detector.weights": "--detector-weights",
    "embedder.model": "--model",
    "embedder.flip": "--flip",
    "crop": "--raw",
    "crop_source": "--crop-source",
}


def stored_config(index_dir: str | Path) -> dict[str, Any]:
    """The config an index was built with (its manifest's, upgraded), its files located from here."""
    manifest = Manifest.read(index_dir)
    data = manifest.built_config
    if data is None:
        raise IndexMismatchError(f"{index_dir}/{MANIFEST} records no config; {REBUILD}")
    detector = dict(data.get("detector") or {})
    record = manifest.detector_weights
    if record:
        found = locate(WeightsRecord.from_dict(record), Path(index_dir))
        detector["weights"] = found or detector.get("weights")
    elif detector.get("weights"):
        detector["weights"] = _from_here(str(detector["weights"]))
    embedder = dict(data.get("embedder") or {})
    if embedder.get("model"):
        embedder["model"] = _from_here(str(embedder["model"]))
    runtime = {**(data.get("runtime") or {}), "device": "auto"}  # the building machine's device is not this one's
    return {**data, "detector": detector, "embedder": embedder, "runtime": runtime}


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
    and ``overrides``; refuses (:class:`IndexMismatchError`, one line naming the setting) what would change
    its vectors: the processing (crop mode, detector settings and weights, image limit) and an embedder
    input setting given explicitly. A change of embedder is left to the job's identity check."""
    manifest = Manifest.read(index_dir)
    stored = stored_config(index_dir)
    from_file = read_config_file(config_file) if config_file is not None else {}
    merged = apply_overrides(_merge(stored, from_file), overrides or [])
    config = from_dict(PipelineConfig, merged)
    typed = {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}
    filed = set(_flatten(from_file))

    def refuse(key: str, value: Any) -> IndexMismatchError:
        flag = FLAGS.get(key, f"--set {key}") if key in typed or key not in filed else f"--config {config_file}"
        return IndexMismatchError(
            f"{flag}: {index_dir} was built with {key}={value}; leave the setting out to add to the index with "
            f"its own settings, or choose another --out for a new index"
        )

    for key in sorted(typed & set(EMBEDDER_INPUT)):
        if _get(stored, key) != _get(merged, key):
            raise refuse(key, repr(_get(stored, key)))
    check_detector_file(manifest, Path(index_dir), config, explicit="detector.weights" in typed | filed)
    now, before = processing_of(config), manifest.processing
    if before is not None and now != before:
        asked = Manifest(processing=now, config={"detector": {"weights": config.detector.weights}})
        adopt_weights_name(manifest, asked)  # may rename the detector in ``now``
        if now != before:
            key, was, _ = first_difference(before, now)
            key = {"max_image_side": "runtime.max_image_side"}.get(key, key)
            raise refuse(key, storage.name(str(was)) if key == "detector.weights" and was else repr(was))
    return config


def check_detector_file(manifest: Manifest, index_dir: Path, config: PipelineConfig, explicit: bool) -> None:
    """Refuse to grow a cropped index with detector weights other than its own (compared by SHA-256), or when
    its own can no longer be found (neither the copy inside it nor the recorded source)."""
    if not manifest.detector_weights or not config.crop:
        return
    weights = WeightsRecord.from_dict(manifest.detector_weights)
    asked = Path(str(config.detector.weights)).expanduser()
    if explicit and asked.is_file():
        if sha256_file(asked) != weights.sha256:
            raise IndexMismatchError(
                f"--detector-weights: {index_dir} was built with other detector weights ({weights.name}, SHA-256 "
                f"{weights.sha256[:12]}…); leave the flag out, or choose another --out for a new index"
            )
        return
    if not explicit and locate(weights, index_dir) is None:
        raise IndexMismatchError(
            f"{index_dir}'s detector weights ({weights.name}, SHA-256 {weights.sha256[:12]}…) are neither in "
            f"{index_dir}/{BUNDLE_DIR} nor at {weights.source}: pass --detector-weights PATH to that file"
        )


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
