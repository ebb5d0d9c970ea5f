"""The torch device a run uses: ``auto`` or a name, checked against the devices this machine has."""

from __future__ import annotations

import torch

from carsearch.config import DEVICE_NAMES, DEVICE_PATTERN
from carsearch.errors import ConfigError


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
