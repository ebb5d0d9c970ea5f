"""Stage 2: embed crops into L2-normalised vectors (timm backbone + head), and train embedders.

The names below load on first use (PEP 562), so reading the model table (:mod:`carsearch.embedder.zoo`, for
``carsearch models``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from carsearch.lazy import lazy_attributes

if TYPE_CHECKING:
    from carsearch.embedder.checkpoint import load_checkpoint, save_checkpoint
    from carsearch.embedder.embedder import Embedder
    from carsearch.embedder.model import EmbeddingModel, ModelSpec, default_spec
    from carsearch.embedder.preprocessing import Preprocessing

__all__ = [
    "Embedder",
    "EmbeddingModel",
    "ModelSpec",
    "Preprocessing",
    "default_spec",
    "load_checkpoint",
    "save_checkpoint",
]
_HOMES = {
    "Embedder": "carsearch.embedder.embedder",
    "EmbeddingModel": "carsearch.embedder.model",
    "ModelSpec": "carsearch.embedder.model",
    "Preprocessing": "carsearch.embedder.preprocessing",
    "default_spec": "carsearch.embedder.model",
    "load_checkpoint": "carsearch.embedder.checkpoint",
    "save_checkpoint": "carsearch.embedder.checkpoint",
}

__getattr__ = lazy_attributes(__name__, _HOMES)
