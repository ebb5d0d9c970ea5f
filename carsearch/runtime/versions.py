"""The installed versions that decide a run's vectors, recorded with its results."""

from __future__ import annotations

import importlib.metadata as md


def versions() -> dict[str, str]:
    """Installed versions of carsearch and the libraries that decide its vectors (recorded with results)."""
    found = {}
    for package in ("carsearch", "torch", "timm", "onnxruntime", "faiss-cpu", "faiss-gpu", "ultralytics"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return found
