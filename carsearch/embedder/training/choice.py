"""Which checkpoint of a training run is its model, and which features that model embeds with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from carsearch.embedder.model import EmbeddingModel, ModelSpec
from carsearch.embedder.training.config import ModelConfig
from carsearch.embedder.training.module import FeatureKind
from carsearch.embedder.training.run_metrics import RunMetrics
from carsearch.errors import ModelLoadError


def choose_embedding(model: ModelConfig, selected: dict[str, Any] | None, select: str) -> tuple[FeatureKind, str]:
    """What the exported model embeds with, and why: ``model.embed_with``, or for ``auto`` the higher of
    head and pooled features on the validation classes at the selected epoch (``selected``: its metrics)."""
    if model.embedding_dim is None:
        return "pooled", "no head (model.embedding_dim=null)"
    if model.embed_with != "auto":
        return model.embed_with, f"model.embed_with={model.embed_with}"
    if selected is None:
        return "head", "model.embed_with=auto without validation classes keeps the head"
    metric = select if f"pooled_{select}" in selected else "map_at_r"
    head, pooled = selected[metric], selected[f"pooled_{metric}"]
    chosen: FeatureKind = "pooled" if pooled > head else "head"
    return chosen, f"val {metric} at epoch {selected['epoch']}: pooled {pooled:.4f}, head {head:.4f}"


def best_checkpoint(run_dir: str | Path) -> Path:
    """The run's selected Lightning checkpoint (from ``metrics.json``, else the newest in ``checkpoints/``)."""
    run_dir = Path(run_dir)
    metrics = RunMetrics.read(run_dir)
    if metrics is not None and metrics.checkpoint and Path(metrics.checkpoint).exists():
        return Path(metrics.checkpoint)
    candidates = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ModelLoadError(f"no Lightning checkpoint in {run_dir}/checkpoints; is {run_dir} a training run?")
    return candidates[-1]


def load_trained_model(checkpoint: str | Path) -> EmbeddingModel:
    """The :class:`EmbeddingModel` of a Lightning checkpoint written by :func:`train` (no pretrained download)."""
    try:
        payload = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise ModelLoadError(f"cannot read Lightning checkpoint {checkpoint}: {exc}") from exc
    hparams = payload.get("hyper_parameters", {})
    if "spec" not in hparams:
        raise ModelLoadError(f"{checkpoint} is not a carsearch training checkpoint (no model spec)")
    model = EmbeddingModel(ModelSpec.from_dict(hparams["spec"]), pretrained=False)
    state = {k.removeprefix("model."): v for k, v in payload["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{checkpoint} does not match its own model spec: {exc}") from exc
    return model.eval()


def run_embedding(run_dir: str | Path) -> FeatureKind:
    """What a run's model embeds with: ``metrics.json``'s choice, else the config's fixed ``model.embed_with``,
    else the head (runs written before the choice existed)."""
    run_dir = Path(run_dir)
    metrics, config_file = RunMetrics.read(run_dir), run_dir / "config.yaml"
    if metrics is not None and metrics.embedding_name is not None:
        return metrics.embedding_name
    if config_file.exists():
        fixed = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("embed_with")
        if fixed in ("head", "pooled"):
            return fixed
    return "head"
