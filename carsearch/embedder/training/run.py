"""Train an embedder into a run directory, and export its best checkpoint for inference.

A run directory holds ``config.yaml`` (resolved), ``classes.json`` (the train / val / test classes),
``checkpoints/`` (Lightning: best by ``trainer.select``'s validation metric, or the last epoch),
logs, and ``metrics.json`` (test metrics of the selected model, zero-shot metrics, validation history, times).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from carsearch.config import EmbedderConfig, to_dict
from carsearch.data.atomic import atomic_write_bytes, atomic_write_json
from carsearch.embedder.checkpoint import save_checkpoint, weights_fingerprint
from carsearch.embedder.inference import Embedder
from carsearch.embedder.model import EmbeddingModel, ModelSpec, default_spec, without_head
from carsearch.embedder.onnx import export_onnx
from carsearch.embedder.training.config import ModelConfig, TrainConfig, TrainerConfig
from carsearch.embedder.training.datamodule import EmbedderDataModule
from carsearch.embedder.training.module import EmbedderModule, Embedding
from carsearch.embedder.zoo import DEFAULT_MODEL
from carsearch.errors import ConfigError, ModelLoadError
from carsearch.runtime import configure_threads

logger = logging.getLogger(__name__)

RUN_NAME_ENV = "CARSEARCH_RUN_NAME"


def resolve_trainer(config: TrainerConfig) -> tuple[str, str]:
    """(accelerator, precision) for this machine: mixed precision only on GPU, 32-true on CPU."""
    gpu = torch.cuda.is_available()
    accelerator = config.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if gpu else "cpu"
    if accelerator in ("gpu", "cuda") and not gpu:
        raise ConfigError("trainer.accelerator=gpu but CUDA is not available; use trainer.accelerator=cpu")
    precision = config.precision
    if "spawn" in config.strategy:
        raise ConfigError(f"trainer.strategy={config.strategy} is not supported; use ddp (one process per device)")
    if precision == "auto":
        precision = (
            ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if accelerator != "cpu" else "32-true"
        )
    elif accelerator == "cpu" and precision != "32-true":
        raise ConfigError(f"trainer.precision={precision} is for GPUs; on CPU use 32-true (or auto)")
    return accelerator, precision


def _is_ddp_child() -> bool:
    """Whether this process was started by Lightning's DDP launcher for a rank other than 0 (single node)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0


def run_directory(config: TrainConfig) -> Path:
    """``out.dir/out.name`` (a timestamped name by default); refuses a finished run unless ``out.overwrite``.

    DDP ranks started by Lightning re-run the command; they inherit rank 0's name through the environment
    (on several nodes, set ``out.name``). Overwriting removes the old run's checkpoints.
    """
    name = config.out.name
    if not name:
        inherited = os.environ.get(RUN_NAME_ENV)
        name = inherited if inherited and _is_ddp_child() else f"{datetime.now():%Y%m%d-%H%M%S}-{config.loss.name}"
        os.environ[RUN_NAME_ENV] = name
    run_dir = Path(config.out.dir).expanduser() / name
    if (run_dir / "metrics.json").exists() or (run_dir / "checkpoints").exists():
        if not config.out.overwrite and not _is_ddp_child():
            raise ConfigError(
                f"run directory {run_dir} already holds a run; pick another out.name or out.overwrite=true"
            )
        if not _is_ddp_child():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            (run_dir / "metrics.json").unlink(missing_ok=True)
    return run_dir


def model_spec(config: TrainConfig) -> ModelSpec:
    """The spec of the model to train: backbone data config, the training image size and head."""
    spec = default_spec(
        config.model.backbone,
        config.model.embedding_dim,
        config.data.image_size,
        pooling=config.model.pooling,
        resize=config.data.resize,
        image_width=config.data.image_width,
    )
    return dataclasses.replace(spec, head_bn=config.model.head_bn)


def choose_embedding(model: ModelConfig, selected: dict[str, Any] | None, select: str) -> tuple[Embedding, str]:
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
    chosen: Embedding = "pooled" if pooled > head else "head"
    return chosen, f"val {metric} at epoch {selected['epoch']}: pooled {pooled:.4f}, head {head:.4f}"


def _logger(run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE

    if _TENSORBOARD_AVAILABLE:
        return TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    logger.info("tensorboard is not installed: logging to %s/logs/metrics.csv", run_dir)
    return CSVLogger(save_dir=str(run_dir), name="logs", version="")


def _strategy(config: TrainConfig) -> str:
    """DDP with a frozen warm-up needs unused-parameter detection (the backbone has no gradient at first)."""
    strategy = config.trainer.strategy
    if strategy == "ddp" and config.optim.frozen_warmup_epochs > 0:
        return "ddp_find_unused_parameters_true"
    return strategy


def train(config: TrainConfig) -> Path:
    """Train; pick the epoch on validation classes (or keep the last one); test once; returns the run directory.

    ``metrics.json`` holds zero-shot and final validation/test metrics: the test classes are evaluated
    twice only, before training (zero-shot) and with the selected model, and choose nothing.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    started = time.perf_counter()
    accelerator, precision = resolve_trainer(config.trainer)
    run_dir = run_directory(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator == "cpu":
        configure_threads(config.trainer.threads)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)

    spec = model_spec(config)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else Path(config.out.dir).expanduser() / "cache"
    data = EmbedderDataModule(
        config.data,
        spec.preprocessing,
        cache_dir=cache_dir,
        seed=config.trainer.seed,
        detector_device="cuda" if accelerator != "cpu" else "cpu",
    )
    if not _is_ddp_child():
        data.prepare_data()  # detector boxes and image cache, before Lightning starts other ranks
    data.setup("fit")
    module = EmbedderModule(
        spec, data.num_train_classes, config.model, config.loss, config.optim, config.trainer.micro_batch
    )
    validating = data.val_set is not None
    select = config.trainer.select
    # a fixed model.embed_with=pooled picks its epoch by the pooled features' metric: the ones it exports
    prefix = "pooled_" if config.model.embed_with == "pooled" and config.model.embedding_dim else ""
    monitor = f"val/{prefix}{select}" if validating and select != "last" else None

    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    atomic_write_json(run_dir / "classes.json", data.splits.to_dict())

    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-epoch{epoch:03d}" if monitor else "last-epoch{epoch:03d}",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    callbacks: list[Any] = [checkpoint]
    if monitor and config.trainer.patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=config.trainer.patience))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=config.trainer.devices,
        strategy=_strategy(config),
        precision=precision,
        max_epochs=config.trainer.max_epochs,
        limit_train_batches=config.trainer.limit_train_batches,
        limit_val_batches=None if validating else 0,
        check_val_every_n_epoch=config.trainer.val_every,
        log_every_n_steps=config.trainer.log_every_n_steps,
        gradient_clip_val=config.optim.grad_clip,
        num_sanity_val_steps=0,  # the zero-shot validation below covers it
        use_distributed_sampler=False,  # PK batches come from PKSampler, one stream per rank
        enable_progress_bar=config.trainer.progress_bar,
        logger=_logger(run_dir),
        callbacks=callbacks,
        default_root_dir=str(run_dir),
    )
    zero_shot: dict[str, Any] = {"val": None, "test": None}
    if validating:
        trainer.validate(module, datamodule=data, verbose=False)
        zero_shot["val"] = module.val_history[-1] if module.val_history else None
        module.val_history.clear()
    testing = data.test_set is not None and trainer.global_rank == 0
    has_head = config.model.embedding_dim is not None
    candidates: list[Embedding] = (
        ["head", "pooled"]
        if has_head and config.model.embed_with == "auto" and validating
        else [choose_embedding(config.model, None, select)[0]]
    )
    zero_shot_test: dict[Embedding, dict[str, float]] = {}
    if testing:  # before training, for each embedding the run may export (choosing nothing)
        zero_shot_test = module.evaluate(data.eval_loader(data.test_set), data.splits.test, candidates)
    fit_started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # frozen layers, on purpose
        trainer.fit(module, datamodule=data)
    train_time = time.perf_counter() - fit_started

    if trainer.global_rank == 0:
        selected = Path(checkpoint.best_model_path).resolve() if checkpoint.best_model_path else None
        history = module.val_history
        key = prefix + ("map_at_r" if select == "last" else select)
        best = max(history, key=lambda m: m[key]) if history else None
        embedding, reason = choose_embedding(
            config.model, (best if monitor else history[-1]) if history else None, select
        )
        test = None
        if testing:
            if selected is not None:  # the selected epoch's weights, not whatever the last epoch left
                module.load_state_dict(
                    torch.load(selected, map_location=module.device, weights_only=True)["state_dict"]
                )
            test = module.evaluate(data.eval_loader(data.test_set), data.splits.test, [embedding])[embedding]
            zero_shot["test"] = zero_shot_test.get(embedding)
        metrics = {
            "test": test,
            "zero_shot": zero_shot,
            "embedding": {
                "name": embedding,
                "dim": int(module.model.dim if embedding == "head" else module.model.backbone.num_features),
                "chosen_by": reason,
            },
            "selected_by": monitor or "last epoch (fixed schedule)",
            "selected_epoch": best["epoch"] if monitor and best else int(trainer.current_epoch) - 1,
            "val": {"best": best, "final": history[-1] if history else None, "history": history},
            "checkpoint": str(selected) if selected else None,
            "epochs": int(trainer.current_epoch),
            "global_steps": int(trainer.global_step),
            "images": {
                "train": len(data.train_set or []),
                "val": len(data.val_set or []),
                "test": len(data.test_set or []),
            },
            "classes": {name: len(classes) for name, classes in data.splits.to_dict().items()},
            "train_time_s": round(train_time, 1),
            "wall_time_s": round(time.perf_counter() - started, 1),
            "resolved": {"accelerator": accelerator, "precision": precision, "world_size": trainer.world_size},
        }
        atomic_write_json(run_dir / "metrics.json", metrics)
        logger.info(
            "run %s: test R@1 %s → %s (selected: %s, epoch %s), training %.0f s",
            run_dir,
            (zero_shot["test"] or {}).get("recall_at_1"),
            (test or {}).get("recall_at_1"),
            metrics["selected_by"],
            metrics["selected_epoch"],
            train_time,
        )
    return run_dir


def best_checkpoint(run_dir: str | Path) -> Path:
    """The run's selected Lightning checkpoint (from ``metrics.json``, else the newest in ``checkpoints/``)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        recorded = json.loads(metrics_file.read_text()).get("checkpoint")
        if recorded and Path(recorded).exists():
            return Path(recorded)
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


def run_embedding(run_dir: str | Path) -> Embedding:
    """What a run's model embeds with: ``metrics.json``'s choice, else the config's fixed ``model.embed_with``,
    else the head (runs written before the choice existed)."""
    run_dir = Path(run_dir)
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.yaml"
    if metrics_file.exists():
        recorded = (json.loads(metrics_file.read_text()).get("embedding") or {}).get("name")
        if recorded in ("head", "pooled"):
            return recorded
    if config_file.exists():
        fixed = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("embed_with")
        if fixed in ("head", "pooled"):
            return fixed
    return "head"


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


def export(
    run_dir: str | Path | None,
    out_path: str | Path,
    fmt: str = "pt",
    embedding: Embedding | None = None,
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
    extra: dict[str, Any] = {}
    if run_dir is None:
        embedder = Embedder.from_config(EmbedderConfig(model=model_name, runtime="torch"))
        model, source = embedder.model, model_name
        if embedder.train_labels:
            extra["train_labels"] = list(embedder.train_labels)
    else:
        run_dir = Path(run_dir)
        checkpoint = best_checkpoint(run_dir)
        model, source = load_trained_model(checkpoint), str(checkpoint)
        chosen = embedding or run_embedding(run_dir)
        if chosen == "pooled":
            model = without_head(model)
        extra = {"run": run_dir.name, "lightning_checkpoint": checkpoint.name, "embedding": chosen}
        classes_file = run_dir / "classes.json"
        if classes_file.exists():
            extra["train_labels"] = sorted(json.loads(classes_file.read_text()).get("train") or [])
        metrics_file = run_dir / "metrics.json"
        if metrics_file.exists() and chosen == run_embedding(run_dir):  # the run's metrics are of this embedding
            recorded = json.loads(metrics_file.read_text())
            for name in ("test", "zero_shot"):
                if recorded.get(name):
                    extra[f"{name}_metrics"] = recorded[name]
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


def device_overrides(device: str | None) -> list[str]:
    """``--device`` as trainer overrides: auto, cpu, cuda (all visible GPUs) or cuda:N (GPU N)."""
    if device is None:
        return []
    if device in ("auto", "cpu"):
        return [f"trainer.accelerator={device}"]
    if device == "cuda":
        return ["trainer.accelerator=gpu"]
    if device.startswith("cuda:") and device[5:].isdigit():
        return ["trainer.accelerator=gpu", f"trainer.devices={device[5:]},"]
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
