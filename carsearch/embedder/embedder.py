"""The inference embedder: RGB crops in, (N, D) L2-normalised float32 vectors out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from carsearch.config import EmbedderConfig
from carsearch.embedder import zoo
from carsearch.embedder.checkpoint import model_from_payload, read_checkpoint, train_labels, weights_fingerprint
from carsearch.embedder.model import EmbeddingModel, at_input_size, default_spec
from carsearch.embedder.onnx import OnnxRunner, onnxruntime_available
from carsearch.embedder.preprocessing import Preprocessing, eval_transform, tensor_transform
from carsearch.errors import ModelLoadError


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``auto``: onnxruntime on CPU when it is installed, torch otherwise (and always on CUDA)."""
    if runtime == "auto":
        return "onnx" if device.type == "cpu" and onnxruntime_available() else "torch"
    if runtime not in ("torch", "onnx"):
        raise ModelLoadError(f"unknown embedder.runtime {runtime!r}; valid: auto, torch, onnx")
    return runtime


class Embedder:
    """Batched, no-grad embedding of PIL images with a fixed :class:`EmbeddingModel`."""

    def __init__(
        self,
        model: EmbeddingModel,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        channels_last: bool = True,
        source: str = "pretrained",
        flip: bool = False,
        runtime: str = "torch",
        train_labels: tuple[str, ...] | None = None,
    ) -> None:
        self.device = torch.device(device)
        runtime = resolve_runtime(runtime, self.device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # torch eager on CPU is fastest at a few images per pass (cache-bound), onnxruntime at larger batches
        # (benchmarks/rerank.py measures both)
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 32 if runtime == "onnx" else 4)
        self.source = source
        self.train_labels = train_labels  # the classes the model was trained on; () none, None unknown
        self.flip = flip  # test-time augmentation: mean of the image's and its mirror image's embeddings
        self.transform = eval_transform(model.spec.preprocessing)
        self.device_transform = tensor_transform(model.spec.preprocessing)
        self.fingerprint = weights_fingerprint(model)
        # runtime "onnx": the same weights run by onnxruntime (same identity: indexes need no rebuild)
        self.runtime = runtime
        self._onnx: OnnxRunner | None = None  # made on first use: exporting takes seconds, once per model

    @classmethod
    def from_config(cls, config: EmbedderConfig, device: torch.device | str = "cpu") -> Embedder:
        """``config.model``: a shipped name, ``imagenet`` (the pretrained backbone of ``config``) or a checkpoint
        path / URI; a checkpoint is validated against the dimension and input size ``config`` asks for."""
        if config.model == zoo.IMAGENET:
            spec = default_spec(
                config.backbone,
                config.embedding_dim,
                config.image_size,
                resize=config.resize,
                image_width=config.image_width,
            )
            model = EmbeddingModel(spec, pretrained=config.pretrained)
            source = zoo.IMAGENET if config.pretrained else "random"
            labels: tuple[str, ...] | None = ()  # ImageNet holds no car-model classes
        else:
            size = None
            if zoo.is_name(config.model):
                path, sha256 = zoo.shipped_checkpoint(config.model)
                payload, size = read_checkpoint(path, sha256), zoo.MODELS[config.model].image_size
            else:
                payload = read_checkpoint(config.model)
            model = model_from_payload(payload, config.model)
            if size is not None:
                model = at_input_size(model, size)
            _check_asked(config, model)
            source, labels = config.model, train_labels(payload)
        return cls(model, device, config.batch_size, config.channels_last, source, config.flip, config.runtime, labels)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.spec.preprocessing

    @property
    def identity(self) -> dict[str, Any]:
        """What must match between an index and the embedder that queries it."""
        identity: dict[str, Any] = {
            "spec": self.model.spec.to_dict(),
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "source": self.source,  # the model's name or path: informative, never compared
        }
        if self.train_labels is not None:
            identity["train_labels"] = list(self.train_labels)
        return {**identity, "tta": "flip"} if self.flip else identity

    def tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess to a (B, 3, S, S) tensor; on CUDA the resize runs on the GPU (the CPU was the bottleneck)."""
        if self.device.type == "cuda":
            return torch.stack(
                [self.device_transform(pil_to_tensor(image).to(self.device, non_blocking=True)) for image in images]
            )
        return torch.stack([self.transform(image) for image in images])

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) preprocessed tensor → (B, D) float32, L2-normalised."""
        out = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size].to(self.device, non_blocking=True)
            if self.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            vectors = self._forward(chunk)
            if self.flip:
                vectors = vectors + self._forward(chunk.flip(-1))
            out.append(torch.nn.functional.normalize(vectors, dim=1).cpu())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings of one preprocessed chunk (fp16 autocast on CUDA)."""
        if self.runtime == "onnx":
            if self._onnx is None:
                self._onnx = OnnxRunner(self.model, self.fingerprint, self.device)
            return torch.nn.functional.normalize(self._onnx(chunk), dim=1)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return torch.nn.functional.normalize(self.model(chunk).float(), dim=1)
        return torch.nn.functional.normalize(self.model(chunk).float(), dim=1)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of RGB images."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensors(self.tensors(images))


def _check_asked(config: EmbedderConfig, model: EmbeddingModel) -> None:
    """A checkpoint embeds at its own dimension and input size: refuse a config that asks for others."""
    if config.embedding_dim is not None and config.embedding_dim != model.dim:
        raise ModelLoadError(
            f"model {config.model} embeds to {model.dim} dimensions, config asks for {config.embedding_dim}; "
            "drop embedder.embedding_dim or use a matching model"
        )
    height, width = model.spec.preprocessing.input_size
    asked = (config.image_size or height, config.image_width or (config.image_size or height))
    if (config.image_size, config.image_width) != (None, None) and asked != (height, width):
        raise ModelLoadError(
            f"model {config.model} embeds at {height}x{width} px (height x width), config asks for "
            f"{asked[0]}x{asked[1]}; drop embedder.image_size / image_width, or use embedder.model=imagenet "
            "for the pretrained backbone at another size"
        )
