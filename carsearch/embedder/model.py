"""Backbone + pooling + optional linear head → L2-normalised embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

from carsearch.config import DEFAULT_BACKBONE, ResizeMode
from carsearch.embedder.backbones import create_backbone, data_config
from carsearch.embedder.preprocessing import Preprocessing

Pooling = Literal["avg", "max", "avgmax", "gem"]  # avgmax: (avg + max) / 2, timm's SelectAdaptivePool2d


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an :class:`EmbeddingModel` (stored in checkpoints and manifests)."""

    backbone: str = DEFAULT_BACKBONE
    pooling: Pooling = "avg"
    embedding_dim: int | None = None  # None: the pooled backbone features, no head
    head_bn: bool = False
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "pooling": self.pooling,
            "embedding_dim": self.embedding_dim,
            "head_bn": self.head_bn,
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            backbone=str(data["backbone"]),
            pooling=data.get("pooling", "avg"),
            embedding_dim=data.get("embedding_dim"),
            head_bn=bool(data.get("head_bn", False)),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
        )


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.) with a learnable exponent ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class EmbeddingModel(nn.Module):
    """``forward(x)``: (B, 3, S, S) normalised images → (B, D) L2-normalised embeddings."""

    def __init__(self, spec: ModelSpec, pretrained: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec.backbone, pretrained=pretrained)
        if spec.pooling not in ("avg", "max", "avgmax", "gem"):
            raise ValueError(f"unknown pooling {spec.pooling!r}; valid: avg, max, avgmax, gem")
        self.pool: nn.Module = GeM() if spec.pooling == "gem" else SelectAdaptivePool2d(pool_type=spec.pooling)
        # timm's plain int attribute; torch's stub types unknown Module attributes as Tensor | Module
        features = int(cast(int, self.backbone.num_features))
        if spec.embedding_dim is None:
            self.head: nn.Module = nn.Identity()
            self.dim = features
        else:
            linear = nn.Linear(features, spec.embedding_dim)
            nn.init.kaiming_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers: list[nn.Module] = [linear]
            if spec.head_bn:
                layers.append(nn.BatchNorm1d(spec.embedding_dim))
            self.head = nn.Sequential(*layers)
            self.dim = spec.embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, C), before the head."""
        return self.pool(self.backbone(x)).flatten(1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, C) → L2-normalised embeddings (B, D): the head, then normalisation."""
        return F.normalize(self.head(features), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(x))


def without_head(model: EmbeddingModel) -> EmbeddingModel:
    """A model that embeds with ``model``'s pooled backbone features (same weights, head dropped)."""
    if model.spec.embedding_dim is None:
        return model
    spec = ModelSpec(backbone=model.spec.backbone, pooling=model.spec.pooling, preprocessing=model.spec.preprocessing)
    pooled = EmbeddingModel(spec, pretrained=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    pooled.load_state_dict(state, strict=True)
    return pooled.train(model.training)


def at_input_size(model: EmbeddingModel, image_size: int) -> EmbeddingModel:
    """``model``, changed in place to embed ``image_size`` × ``image_size`` inputs (squashed) instead of its
    recorded size. The weights are unchanged (a convolutional backbone with global pooling takes any size);
    only the spec, and with it the preprocessing that checkpoints and index manifests record, changes.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    pre = replace(model.spec.preprocessing, image_size=image_size, image_width=None, resize="squash")
    model.spec = replace(model.spec, preprocessing=pre)
    return model


def default_spec(
    backbone: str = DEFAULT_BACKBONE,
    embedding_dim: int | None = None,
    image_size: int | None = None,
    pooling: Pooling = "avg",
    resize: ResizeMode = "squash",
    image_width: int | None = None,
) -> ModelSpec:
    """A spec whose preprocessing comes from the backbone's timm data config."""
    probe = create_backbone(backbone, pretrained=False)
    pre = Preprocessing.from_timm(data_config(probe), image_size=image_size, resize=resize, image_width=image_width)
    return ModelSpec(backbone=backbone, pooling=pooling, embedding_dim=embedding_dim, preprocessing=pre)
