"""Device choice and CPU thread settings (called explicitly; nothing happens at import)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


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
