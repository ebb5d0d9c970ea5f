"""The inference embedder: RGB crops in, (N, D) L2-normalised float32 vectors out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from carsearch.config import EmbedderConfig
from carsearch.embedder.checkpoint import load_checkpoint, weights_fingerprint
from carsearch.embedder.model import EmbeddingModel, default_spec
from carsearch.embedder.onnx import OnnxRunner
from carsearch.embedder.preprocessing import Preprocessing, eval_transform, tensor_transform
from carsearch.errors import ModelLoadError


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
    ) -> None:
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Measured on a 2-core CPU: 50 img/s at 1-4 images per pass, 38 at 32, 29 at 64 (cache-bound).
        # onnxruntime on 2 CPU cores: 65 img/s at 1 image per pass, 118 at 4, 152 at 32 (benchmarks/rerank.py).
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 32 if runtime == "onnx" else 4)
        self.source = source
        self.flip = flip  # test-time augmentation: mean of the image's and its mirror image's embeddings
        self.transform = eval_transform(model.spec.preprocessing)
        self.device_transform = tensor_transform(model.spec.preprocessing)
        self.fingerprint = weights_fingerprint(model)
        # runtime "onnx": the same weights run by onnxruntime (same identity: indexes need no rebuild)
        self.runtime = runtime
        self._onnx = OnnxRunner(model, self.fingerprint, self.device) if runtime == "onnx" else None

    @classmethod
    def from_config(cls, config: EmbedderConfig, device: torch.device | str = "cpu") -> Embedder:
        """The pretrained backbone of ``config``, or its trained checkpoint (validated against it)."""
        if config.checkpoint:
            model = load_checkpoint(config.checkpoint)
            spec = model.spec
            if config.embedding_dim is not None and config.embedding_dim != model.dim:
                raise ModelLoadError(
                    f"checkpoint {config.checkpoint} embeds to {model.dim} dimensions, config asks for "
                    f"{config.embedding_dim}; drop embedder.embedding_dim or use a matching checkpoint"
                )
            height, width = spec.preprocessing.input_size
            asked = (config.image_size or height, config.image_width or (config.image_size or height))
            if (config.image_size, config.image_width) != (None, None) and asked != (height, width):
                raise ModelLoadError(
                    f"checkpoint {config.checkpoint} was trained at {height}x{width} px (height x width), config "
                    f"asks for {asked[0]}x{asked[1]}; drop embedder.image_size / image_width or use a matching "
                    "checkpoint"
                )
            source = f"checkpoint:{config.checkpoint}"
        else:
            spec = default_spec(
                config.backbone,
                config.embedding_dim,
                config.image_size,
                resize=config.resize,
                image_width=config.image_width,
            )
            model = EmbeddingModel(spec, pretrained=config.pretrained)
            source = "pretrained" if config.pretrained else "random"
        return cls(model, device, config.batch_size, config.channels_last, source, config.flip, config.runtime)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.spec.preprocessing

    @property
    def identity(self) -> dict[str, Any]:
        """What must match between an index and the embedder that queries it."""
        identity = {
            "spec": self.model.spec.to_dict(),
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "source": self.source,
        }
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
        if self._onnx is not None:
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
