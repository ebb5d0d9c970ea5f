"""Training the embedder: PK-sampled class-disjoint data, PML losses, a Lightning module, export for inference.

Imports Lightning; ``carsearch.embedder`` itself does not import this sub-package.
"""

from carsearch.embedder.training.choice import load_trained_model
from carsearch.embedder.training.config import TrainConfig, load_train_config
from carsearch.embedder.training.datamodule import EmbedderDataModule
from carsearch.embedder.training.exporter import export
from carsearch.embedder.training.module import EmbedderModule
from carsearch.embedder.training.run import train

__all__ = [
    "EmbedderDataModule",
    "EmbedderModule",
    "TrainConfig",
    "export",
    "load_train_config",
    "load_trained_model",
    "train",
]
