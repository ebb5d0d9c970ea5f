"""Stage 2: embed crops into L2-normalised vectors (timm backbone + head), and train embedders."""

from carsearch.embedder.checkpoint import load_checkpoint, save_checkpoint
from carsearch.embedder.inference import Embedder
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
