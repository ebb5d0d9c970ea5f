"""Device choice and CPU thread settings (called explicitly; nothing happens at import)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
from typing import Any

import torch

from carsearch.config import DEVICE_NAMES, DEVICE_PATTERN
from carsearch.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU. A device this machine lacks (``cuda`` without a GPU, ``cuda:3``
    with one GPU, ``mps`` off Apple silicon) or an unknown name is a one-line :class:`ConfigError` that names the
    devices present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"unknown device {name!r}: use one of {DEVICE_NAMES}; available here: {_available()}")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"CUDA was asked for (--device {name}) but this machine has no CUDA device; available: {_available()}"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{name} asked for, {count} GPU{'s' if count > 1 else ''} present; available: {_available()}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"MPS was asked for (--device mps) but this machine has none; available: {_available()}")
    return device


def _available() -> str:
    """The devices torch can use here: cpu, cuda:0 … cuda:N-1, mps."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def configure_threads(threads: int | None = None) -> int:
    """Set torch (and faiss) CPU threads; ``None`` → all cores.

    Importing ultralytics sets ``OMP_NUM_THREADS=1`` when unset, which would otherwise pin
    everything to one core.
    """
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    try:
        import faiss

        faiss.omp_set_num_threads(count)
    except (ImportError, AttributeError):  # pragma: no cover - faiss is a dependency
        pass
    logger.debug("using %d CPU threads", count)
    return count


def versions() -> dict[str, str]:
    """Installed versions of carsearch and the libraries that decide its vectors (recorded with results)."""
    found = {}
    for package in ("carsearch", "torch", "timm", "onnxruntime", "faiss-cpu", "faiss-gpu", "ultralytics"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return found


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar counting images (None when disabled): the one progress display of the batch commands."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
