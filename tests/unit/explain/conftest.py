"""A constructed embedder whose output depends only on the top-left quadrant of the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carsearch.embedder.model import ModelSpec
from carsearch.embedder.preprocessing import Preprocessing


class QuadrantModel(nn.Module):
    """Zeroes all but the top-left quadrant of the input, then conv → ReLU → conv → ReLU → avg pool."""

    def __init__(self, size: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spec = ModelSpec(backbone="quadrant", preprocessing=Preprocessing(image_size=size))
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1.0
        self.register_buffer("mask", mask)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Identity()
        self.dim = 16

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * self.mask).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


@pytest.fixture
def quadrant_model() -> QuadrantModel:
    return QuadrantModel().eval()
