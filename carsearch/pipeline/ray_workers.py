"""What runs in Ray's worker processes for :mod:`carsearch.pipeline.ray_engine`: the decode task and the
detector and embedder actors.

Ray imports this module in every worker that runs one of them, so it imports only the light bottom layer
at the top: a decode task does not pay for torch, timm, ultralytics and faiss (seconds of CPU per process,
which on a small machine delay the actors' own start). The actors import the models when they are built.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from carsearch.data.decode import Decoded, decode_item
from carsearch.data.sources import SourceItem
from carsearch.data.storage import as_location
from carsearch.types import BBox

if TYPE_CHECKING:
    from carsearch.pipeline.loaded_models import Models
    from carsearch.pipeline.outcomes import Outcome

DECODE_CPUS = 0.25  # logical CPUs a decode task reserves


def _source_item(item: str) -> SourceItem:
    """The item the driver sent as JSON (``[path, label, box, skip_reason]``; see ``ray_engine._dataset``)."""
    path, label, box, skip = json.loads(item)
    return SourceItem(as_location(path), label, BBox(*box) if box else None, skip_reason=skip)


def decode_batch(batch: dict[str, np.ndarray], max_side: int) -> dict[str, np.ndarray]:
    """Read, hash and decode: the image as raw RGB bytes + its shape, or the skip (its content hash equals
    the row's ``indexed`` hash) / error."""
    out: dict[str, list[Any]] = {k: [] for k in ("position", "item", "status", "reason", "hash", "pixels", "shape")}
    for position, item, indexed in zip(batch["position"], batch["item"], batch["indexed"], strict=True):
        source = _source_item(item)
        decoded = decode_item(int(position), source, {str(source.path): str(indexed)} if indexed else {}, max_side)
        pixels = decoded.image if decoded.image is not None else np.zeros((0, 0, 3), np.uint8)
        out["position"].append(int(position))
        out["item"].append(item)
        out["status"].append(decoded.status)
        out["reason"].append(decoded.reason)
        out["hash"].append(decoded.content_hash or "")
        out["pixels"].append(pixels.tobytes())
        size = decoded.original_size or (0, 0)
        out["shape"].append(json.dumps([*pixels.shape[:2], decoded.scale, *size]))
    return {k: np.array(v, dtype=object) for k, v in out.items()}


def _models_in_actor(settings: dict[str, Any]) -> Models:
    from carsearch.config import PipelineConfig
    from carsearch.config_files import apply_overrides, from_dict
    from carsearch.pipeline.loaded_models import Models

    # One thread per actor: the cluster's CPUs are shared out by actors, not by intra-op threads. More threads
    # per actor oversubscribe the cores: on 2 cores they were slower, not faster.
    return Models(from_dict(PipelineConfig, apply_overrides(settings, ["runtime.threads=1"])))


class CropActor:
    """Detector actor: decoded images in, one row per crop (its pixels) or per skipped / failed image out."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.models = _models_in_actor(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = []
        for position, item, status, reason, digest, pixels, shape in zip(
            *(batch[k] for k in ("position", "item", "status", "reason", "hash", "pixels", "shape")), strict=True
        ):
            height, width, scale, *size = json.loads(shape)
            image = np.frombuffer(pixels, np.uint8).reshape(height, width, 3) if status == "ok" else None
            original = tuple(size) if size[0] else None
            source = _source_item(item)
            decoded.append(Decoded(int(position), source, digest or None, status, reason, image, scale, original))
        from carsearch.pipeline.outcomes import crop_decoded

        timings = {"detect": 0.0}
        outcomes, crops = crop_decoded(self.models, decoded, timings)
        return _crop_rows(outcomes, crops, timings["detect"])


def _crop_rows(outcomes: list[Outcome], crops: list[Image.Image], detect_seconds: float) -> dict[str, np.ndarray]:
    rows: dict[str, list[Any]] = {k: [] for k in ("kind", "head", "meta", "pixels", "shape")}
    pending = iter(crops)
    for outcome in outcomes:
        entries = [r.to_dict() for r in outcome.records] if outcome.status == "ok" else [outcome.error]
        for j, entry in enumerate(entries):
            crop = np.asarray(next(pending)) if outcome.status == "ok" else np.zeros((0, 0, 3), np.uint8)
            rows["kind"].append(outcome.status)
            rows["head"].append(j == 0)
            rows["meta"].append(json.dumps({"path": outcome.path, "entry": entry}))
            rows["pixels"].append(crop.tobytes())
            rows["shape"].append(json.dumps(crop.shape[:2]))
    out = {k: np.array(v, dtype=object) for k, v in rows.items()}
    out["detect_s"] = np.zeros(len(rows["kind"]), np.float64)
    if len(out["detect_s"]):
        out["detect_s"][0] = detect_seconds  # the batch's detector time, once
    return out


class EmbedActor:
    """Embedder actor: crop rows in, their vectors (N, D) out (zeros for rows without a crop)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.models = _models_in_actor(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedder = self.models.embedder
        ok = np.array([kind == "ok" for kind in batch["kind"]], dtype=bool)
        crops = [
            Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(*json.loads(shape), 3))
            for pixels, shape, keep in zip(batch["pixels"], batch["shape"], ok, strict=True)
            if keep
        ]
        vectors = np.zeros((len(ok), embedder.dim), np.float32)
        tic = time.perf_counter()
        if crops:
            vectors[ok] = embedder.embed(crops)
        embed_s = np.zeros(len(ok), np.float64)
        if len(ok):
            embed_s[0] = time.perf_counter() - tic
        keep = ("kind", "head", "meta", "detect_s")
        return {**{k: batch[k] for k in keep}, "vector": vectors, "embed_s": embed_s}
