"""Export a training run's model (or a named model) for inference: a checkpoint or an ONNX graph."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from carsearch.config import EmbedderConfig
from carsearch.embedder.checkpoint import save_checkpoint, weights_fingerprint
from carsearch.embedder.embedder import Embedder
from carsearch.embedder.model import EmbeddingModel, without_head
from carsearch.embedder.onnx import export_onnx
from carsearch.embedder.training.choice import best_checkpoint, load_trained_model, run_embedding
from carsearch.embedder.training.module import FeatureKind
from carsearch.embedder.training.run_metrics import RunMetrics
from carsearch.embedder.zoo import DEFAULT_MODEL
from carsearch.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

FP16_TOLERANCE = 1e-3  # the largest embedding difference a float16 checkpoint may make


def half_precision_error(model: EmbeddingModel, images: int = 16, seed: int = 0) -> float:
    """The largest absolute difference between ``model``'s embeddings and those of its float16-rounded weights,
    on smooth random images (gradients + noise) at the model's input size."""
    rounded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    height, width = model.spec.preprocessing.input_size
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(images, 3, 4, 4, generator=generator)
    batch = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    pre = model.spec.preprocessing  # normalised as the model's own inputs are
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    batch = (batch + 0.1 * torch.randn(batch.shape, generator=generator) - mean) / std
    with torch.inference_mode():
        return float((model.eval()(batch) - rounded(batch)).abs().max())


def _named_model(model_name: str) -> tuple[EmbeddingModel, str, dict[str, Any]]:
    """(the model ``model_name``, its name, the classes it was trained on if it records them)."""
    embedder = Embedder.from_config(EmbedderConfig(model=model_name, runtime="torch"))
    extra: dict[str, Any] = {}
    if embedder.train_labels:
        extra["train_labels"] = list(embedder.train_labels)
    return embedder.model, model_name, extra


def _run_model(run_dir: Path, embedding: FeatureKind | None) -> tuple[EmbeddingModel, str, dict[str, Any]]:
    """(the run's best model with ``embedding`` (default: the run's choice), its checkpoint, what to record:
    the run, its classes and, when they are of this embedding, its test and zero-shot metrics)."""
    checkpoint = best_checkpoint(run_dir)
    model, source = load_trained_model(checkpoint), str(checkpoint)
    chosen = embedding or run_embedding(run_dir)
    if chosen == "pooled":
        model = without_head(model)
    extra: dict[str, Any] = {"run": run_dir.name, "lightning_checkpoint": checkpoint.name, "embedding": chosen}
    classes_file = run_dir / "classes.json"
    if classes_file.exists():
        extra["train_labels"] = sorted(json.loads(classes_file.read_text()).get("train") or [])
    metrics = RunMetrics.read(run_dir)
    if metrics is not None and chosen == run_embedding(run_dir):  # the run's metrics are of this embedding
        for name, recorded in (("test", metrics.test), ("zero_shot", metrics.zero_shot)):
            if recorded:
                extra[f"{name}_metrics"] = recorded
    return model, source, extra


def export(
    run_dir: str | Path | None,
    out_path: str | Path,
    fmt: str = "pt",
    embedding: FeatureKind | None = None,
    half: bool = False,
    model_name: str = DEFAULT_MODEL,
) -> Path:
    """Write the run's best model (without a run: the model ``model_name``, the shipped one by default).

    ``fmt="pt"``: an inference checkpoint (``EmbedderConfig(model=out_path)`` loads it) that records the
    classes it was trained on; ``"onnx"``: an ONNX graph of the same model (preprocessed batch in, embeddings
    out) for onnxruntime and other engines. ``embedding``: the head's output or the pooled features before it
    (default: the run's choice). ``half``: store float16 weights, refused when that moves an embedding by more
    than ``FP16_TOLERANCE``.
    """
    if half and fmt != "pt":
        raise ConfigError("float16 weights (--half) are for .pt checkpoints; ONNX files keep float32")
    if run_dir is None:
        model, source, extra = _named_model(model_name)
    else:
        model, source, extra = _run_model(Path(run_dir), embedding)
    if half:
        error = half_precision_error(model)
        if error > FP16_TOLERANCE:
            raise ModelLoadError(
                f"float16 weights move embeddings by {error:.2e} (> {FP16_TOLERANCE:g}); export without --half"
            )
        logger.info("float16 weights: largest embedding difference %.2e", error)
    if fmt == "onnx":
        export_onnx(model, out_path, weights_fingerprint(model))
    elif fmt == "pt":
        save_checkpoint(model, out_path, extra=extra, half=half)
    else:
        raise ConfigError(f"unknown export format {fmt!r}; valid: pt, onnx")
    logger.info("exported %s → %s (%s)", source, out_path, fmt)
    return Path(out_path)
