"""Class-activation maps for an embedding model: where it looks to produce (or match) an embedding.

A retrieval model has no class score to explain; the score here is the similarity between the image's
embedding and a reference embedding (the retrieved item's, or the image's own): the projection of the
embedding *before* L2 normalisation onto the unit reference. Cosine similarity itself would be useless
for an image's own embedding — its gradient is orthogonal to the embedding and vanishes at the reference —
and noisy for near duplicates; the projection's gradient is the reference direction itself (Stylianou et
al., "Visualizing Deep Similarity Networks"). The CAM methods come from ``pytorch_grad_cam``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
from torch import nn

from carsearch.errors import ExplainError
from carsearch.types import CamMethod


class SignCorrectedEigenCAM(EigenCAM):
    """EigenCAM whose principal-component sign is chosen so the salient region is positive.

    Plain EigenCAM keeps SVD's arbitrary sign: about half the maps come out inverted (background hot).
    EigenCAM is gradient-free and class-agnostic: it ignores the similarity target.
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):  # noqa: ANN001, ANN201, D102
        return get_2d_projection_with_sign_correction(activations)


Method = CamMethod  # the names, written once in carsearch.types
METHODS: dict[Method, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "eigencam": SignCorrectedEigenCAM,
}

# The layer whose (B, C, h, w) output is pooled into the embedding, by timm model class.
_TARGET_LAYERS = {"EfficientNet": "bn2", "ResNet": "layer4", "ConvNeXt": "stages"}


class SimilarityTarget:
    """``pytorch_grad_cam`` target: projection of a (D,) unnormalised embedding onto a unit reference (D,)."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = F.normalize(reference.detach().float().flatten(), dim=0)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output.float().flatten() * self.reference.to(output.device)).sum()


class Unnormalised(nn.Module):
    """An embedding model's output before L2 normalisation (``head(features(x))`` when it has those)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, head = getattr(self.model, "features", None), getattr(self.model, "head", None)
        if callable(features) and isinstance(head, nn.Module):
            return head(features(x))
        return self.model(x)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ExplainError(
            f"no layer {name!r} in the model; candidates: {', '.join(candidate_layers(model))}"
        ) from None


def candidate_layers(model: nn.Module, limit: int = 12) -> list[str]:
    """Names of the last modules that output feature maps (convolutions, their blocks and norms)."""
    names = [
        name
        for name, module in model.named_modules()
        if name and (isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Sequential)) or name.count(".") == 1)
    ]
    return names[-limit:]


def find_target_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The CAM layer: ``name`` (a dotted path in ``model``) or, for timm backbones, the last feature map.

    Auto-detection knows timm EfficientNet (``backbone.bn2``), ResNet (``backbone.layer4``) and ConvNeXt
    (``backbone.stages``); anything else needs ``name``, and the error lists candidates.
    """
    if name:
        return _module(model, name)
    backbone = getattr(model, "backbone", model)
    kind = type(backbone).__name__
    if kind not in _TARGET_LAYERS:
        raise ExplainError(
            f"no automatic CAM layer for backbone {kind} (supported: {', '.join(sorted(_TARGET_LAYERS))}); "
            f"pass a layer name, one of: {', '.join(candidate_layers(model))}"
        )
    return _module(backbone, _TARGET_LAYERS[kind])


class EmbeddingCAM:
    """CAMs of a batch in one forward (and one backward for gradient methods).

    ``maps(batch, references)``: (B, 3, S, S) preprocessed images and (B, D) reference embeddings →
    (B, S, S) float32 maps in [0, 1] (min-max normalised per image by ``pytorch_grad_cam``). With no
    references each image is explained against its own embedding (what its embedding is made of).
    """

    def __init__(self, model: nn.Module, method: Method = "gradcam", target_layer: str | None = None) -> None:
        if method not in METHODS:
            raise ExplainError(f"unknown CAM method {method!r}; valid methods: {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.layer = find_target_layer(model, target_layer)

    @property
    def uses_gradients(self) -> bool:
        return self.method != "eigencam"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of a preprocessed batch, without gradients."""
        with torch.no_grad():
            return self.model(batch.to(self._device()))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def maps(self, batch: torch.Tensor, references: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        if batch.ndim != 4 or not len(batch):
            raise ExplainError(f"expected a (B, 3, S, S) batch, got shape {tuple(batch.shape)}")
        batch = batch.to(self._device())
        was_training = self.model.training
        self.model.eval()
        try:
            if references is None:
                references = self.embed(batch)
            references = torch.as_tensor(np.asarray(references) if isinstance(references, np.ndarray) else references)
            if references.ndim != 2 or len(references) != len(batch):
                raise ExplainError(f"need one reference embedding per image, got {tuple(references.shape)}")
            targets = [SimilarityTarget(reference) for reference in references]
            with METHODS[self.method](model=Unnormalised(self.model), target_layers=[self.layer]) as cam:
                if self.uses_gradients:
                    batch = batch.detach().clone().requires_grad_(True)  # gradients reach frozen layers too
                    with torch.enable_grad():
                        maps = cam(input_tensor=batch, targets=targets)
                else:
                    with torch.no_grad():
                        maps = cam(input_tensor=batch, targets=targets)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        return np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
