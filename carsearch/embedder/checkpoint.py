"""Inference checkpoints: ``{"format", "version", "spec", "state_dict"[, "dtype", "extra"]}``, loadable with
``weights_only=True``. ``extra`` may hold ``train_labels``, the classes the model was trained on."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from carsearch.data import storage
from carsearch.data.atomic import atomic_write_bytes
from carsearch.embedder.model import EmbeddingModel, ModelSpec
from carsearch.embedder.zoo import names_hint, verified_bytes
from carsearch.errors import ModelLoadError

FORMAT = "carsearch-embedder"
VERSION = 1


def save_checkpoint(
    model: EmbeddingModel, path: str | Path, extra: dict[str, Any] | None = None, half: bool = False
) -> None:
    """Write an inference checkpoint atomically (CPU tensors, plain-data spec).

    ``half``: floating-point tensors stored as float16 (half the file); they load back into float32.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, "spec": model.spec.to_dict(), "state_dict": state}
    payload["dtype"] = "float16" if half else "float32"
    if extra:
        payload["extra"] = extra
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """The checkpoint's payload, validated; never unpickles arbitrary objects.

    ``sha256``: the file must have this digest (shipped models), else a one-line error says it is damaged.
    """
    try:
        if sha256 is not None:
            source: io.BytesIO | Path = io.BytesIO(verified_bytes(Path(path), sha256))
        else:
            source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else Path(path)
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except FileNotFoundError:
        raise ModelLoadError(f"checkpoint not found: {path}; a model is {names_hint()}") from None
    except OSError as exc:  # an object store that cannot be reached
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise ModelLoadError(f"{path} is not a loadable carsearch checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a carsearch embedder checkpoint (write one with `carsearch export`)")
    if int(payload.get("version", -1)) > VERSION:
        raise ModelLoadError(f"{path} has checkpoint version {payload['version']}; this carsearch reads <= {VERSION}")
    return payload


def model_from_payload(payload: dict[str, Any], where: str | Path) -> EmbeddingModel:
    """Rebuild the float32 model of a checkpoint payload (no pretrained download: the payload has the weights)."""
    spec = ModelSpec.from_dict(payload["spec"])
    model = EmbeddingModel(spec, pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)  # float16 tensors are cast to float32
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {where} does not match its own spec {spec}: {exc}") from exc
    return model


def load_checkpoint(path: str | Path) -> EmbeddingModel:
    """The model of the checkpoint at ``path``."""
    return model_from_payload(read_checkpoint(path), path)


def train_labels(payload: dict[str, Any]) -> tuple[str, ...] | None:
    """The classes a checkpoint's model was trained on (sorted), or None when it does not record them."""
    labels = (payload.get("extra") or {}).get("train_labels")
    return tuple(sorted(str(label) for label in labels)) if isinstance(labels, (list, tuple)) else None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the model's parameters and buffers: two models embed alike iff these match."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
