"""Inference checkpoints: ``{"format", "version", "spec", "state_dict"}``, loadable with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from carsearch.data import storage
from carsearch.data.atomic import atomic_write_bytes
from carsearch.embedder.model import EmbeddingModel, ModelSpec
from carsearch.errors import ModelLoadError

FORMAT = "carsearch-embedder"
VERSION = 1


def save_checkpoint(model: EmbeddingModel, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write an inference checkpoint atomically (CPU tensors, plain-data spec)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "spec": model.spec.to_dict(), "state_dict": state}
    if extra:
        payload["extra"] = extra
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's payload, validated; never unpickles arbitrary objects."""
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else Path(path)
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"checkpoint not found: {path}") from None
    except OSError as exc:  # an object store that cannot be reached
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise ModelLoadError(f"{path} is not a loadable carsearch checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a carsearch embedder checkpoint (write one with `carsearch export`)")
    if int(payload.get("version", -1)) > VERSION:
        raise ModelLoadError(f"{path} has checkpoint version {payload['version']}; this carsearch reads <= {VERSION}")
    return payload


def load_checkpoint(path: str | Path) -> EmbeddingModel:
    """Rebuild the model of a checkpoint (no pretrained download: the checkpoint has the weights)."""
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["spec"])
    model = EmbeddingModel(spec, pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {path} does not match its own spec {spec}: {exc}") from exc
    return model


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the model's parameters and buffers: two models embed alike iff these match."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
