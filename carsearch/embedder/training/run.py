"""Train an embedder into a run directory (its checkpoint choice: ``choice``; export: ``exporter``).

A run directory holds ``config.yaml`` (resolved), ``classes.json`` (the train / val / test classes),
``checkpoints/`` (Lightning: best by ``trainer.select``'s validation metric, or the last epoch),
logs, and ``metrics.json`` (test metrics of the selected model, zero-shot metrics, validation history, times).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
import yaml

from carsearch.config_files import to_dict
from carsearch.data.atomic import atomic_write_bytes, atomic_write_json
from carsearch.embedder.model import ModelSpec, default_spec
from carsearch.embedder.training.averaging import StepAveraging
from carsearch.embedder.training.choice import choose_embedding
from carsearch.embedder.training.config import TrainConfig, TrainerConfig
from carsearch.embedder.training.datamodule import EmbedderDataModule
from carsearch.embedder.training.module import EmbedderModule, FeatureKind
from carsearch.embedder.training.run_metrics import METRICS_FILE, RunMetrics
from carsearch.errors import ConfigError
from carsearch.runtime.threads import configure_threads

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint

logger = logging.getLogger(__name__)

RUN_NAME_ENV = "CARSEARCH_RUN_NAME"

ResolvedPrecision = Literal["32-true", "bf16-mixed", "16-mixed"]  # config.Precision without "auto"


def resolve_trainer(config: TrainerConfig) -> tuple[str, ResolvedPrecision]:
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
    if (run_dir / METRICS_FILE).exists() or (run_dir / "checkpoints").exists():
        if not config.out.overwrite and not _is_ddp_child():
            raise ConfigError(
                f"run directory {run_dir} already holds a run; pick another out.name or out.overwrite=true"
            )
        if not _is_ddp_child():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
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


def averaging_callback(config: TrainerConfig) -> StepAveraging | None:
    """The weight-averaging callback the trainer settings ask for, if any."""
    if config.ema_half_life is not None:
        return StepAveraging(ema_half_life=config.ema_half_life)
    if config.average_last_epochs is not None:
        return StepAveraging(last_epochs=config.average_last_epochs)
    return None


@dataclasses.dataclass
class _Run:
    """What ``train`` sets up before fitting: the run directory, data, model, callbacks and trainer."""

    config: TrainConfig
    run_dir: Path
    accelerator: str
    precision: ResolvedPrecision
    data: EmbedderDataModule
    module: EmbedderModule
    monitor: str | None  # the validation metric that picks the epoch (None: the last epoch is kept)
    prefix: str  # "pooled_" when the metric is the pooled features'
    checkpoint: ModelCheckpoint
    averaging: StepAveraging | None
    trainer: L.Trainer

    @property
    def validating(self) -> bool:
        return self.data.val_set is not None

    @property
    def testing(self) -> bool:
        """Whether this process tests (rank 0, with test classes)."""
        return self.data.test_set is not None and self.trainer.global_rank == 0


def _data_module(config: TrainConfig, spec: ModelSpec, accelerator: str) -> EmbedderDataModule:
    """The data, its detector boxes and image cache prepared (by rank 0) and set up for fitting."""
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
    return data


def _monitor(config: TrainConfig, validating: bool) -> tuple[str | None, str]:
    """(the validation metric that picks the epoch, or None to keep the last one; its feature prefix)."""
    select = config.trainer.select
    # a fixed model.embed_with=pooled picks its epoch by the pooled features' metric: the ones it exports
    prefix = "pooled_" if config.model.embed_with == "pooled" and config.model.embedding_dim else ""
    return (f"val/{prefix}{select}" if validating and select != "last" else None), prefix


def _callbacks(
    config: TrainConfig, run_dir: Path, monitor: str | None
) -> tuple[ModelCheckpoint, StepAveraging | None, list[Any]]:
    """(the checkpoint callback, the weight averaging if any, every callback: those and early stopping)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

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
    averaging = averaging_callback(config.trainer)
    if averaging is not None:
        callbacks.append(averaging)
    return checkpoint, averaging, callbacks


def _trainer(
    config: TrainConfig,
    run_dir: Path,
    accelerator: str,
    precision: ResolvedPrecision,
    validating: bool,
    callbacks: list[Any],
) -> L.Trainer:
    return L.Trainer(
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


def _set_up(config: TrainConfig) -> _Run:
    """Resolve the trainer, create the run directory (``config.yaml``, ``classes.json``), seed, build everything."""
    accelerator, precision = resolve_trainer(config.trainer)
    run_dir = run_directory(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator == "cpu":
        configure_threads(config.trainer.threads)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)

    spec = model_spec(config)
    data = _data_module(config, spec, accelerator)
    module = EmbedderModule(
        spec, data.num_train_classes, config.model, config.loss, config.optim, config.trainer.micro_batch
    )
    validating = data.val_set is not None
    monitor, prefix = _monitor(config, validating)

    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    atomic_write_json(run_dir / "classes.json", data.splits.to_dict())

    checkpoint, averaging, callbacks = _callbacks(config, run_dir, monitor)
    trainer = _trainer(config, run_dir, accelerator, precision, validating, callbacks)
    return _Run(config, run_dir, accelerator, precision, data, module, monitor, prefix, checkpoint, averaging, trainer)


def _zero_shot(run: _Run) -> tuple[dict[str, Any], dict[FeatureKind, dict[str, float]]]:
    """Before training: validation metrics (``{"val": ..., "test": None}``), and the test metrics of every
    embedding the run may export (rank 0; choosing nothing)."""
    config, module, data = run.config, run.module, run.data
    zero_shot: dict[str, Any] = {"val": None, "test": None}
    if run.validating:
        run.trainer.validate(module, datamodule=data, verbose=False)
        zero_shot["val"] = module.val_history[-1] if module.val_history else None
        module.val_history.clear()
    has_head = config.model.embedding_dim is not None
    candidates: list[FeatureKind] = (
        ["head", "pooled"]
        if has_head and config.model.embed_with == "auto" and run.validating
        else [choose_embedding(config.model, None, config.trainer.select)[0]]
    )
    zero_shot_test: dict[FeatureKind, dict[str, float]] = {}
    if run.testing:
        assert data.test_set is not None
        zero_shot_test = module.evaluate(data.eval_loader(data.test_set), data.splits.test, candidates)
    return zero_shot, zero_shot_test


def _fit(run: _Run) -> float:
    """Train; returns the seconds it took."""
    fit_started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # frozen layers, on purpose
        run.trainer.fit(run.module, datamodule=run.data)
    return time.perf_counter() - fit_started


def _choose(run: _Run) -> tuple[dict[str, Any] | None, FeatureKind, str]:
    """(the best validation entry, the embedding to export and why) from the validation history."""
    select = run.config.trainer.select
    history = run.module.val_history
    key = run.prefix + ("map_at_r" if select == "last" else select)
    best = max(history, key=lambda m: m[key]) if history else None
    embedding, reason = choose_embedding(
        run.config.model, (best if run.monitor else history[-1]) if history else None, select
    )
    return best, embedding, reason


def _test(run: _Run, selected: Path | None, embedding: FeatureKind) -> dict[str, float]:
    """The test metrics of ``embedding`` with the selected epoch's weights (not whatever the last epoch left)."""
    module, data = run.module, run.data
    if selected is not None:
        module.load_state_dict(torch.load(selected, map_location=module.device, weights_only=True)["state_dict"])
    assert data.test_set is not None
    return module.evaluate(data.eval_loader(data.test_set), data.splits.test, [embedding])[embedding]


def _run_metrics(
    run: _Run,
    zero_shot: dict[str, Any],
    zero_shot_test: dict[FeatureKind, dict[str, float]],
    train_time: float,
    started: float,
) -> RunMetrics:
    """Select the epoch and embedding, test them once (rank 0) and gather ``metrics.json``."""
    module, data, trainer, monitor = run.module, run.data, run.trainer, run.monitor
    selected = Path(run.checkpoint.best_model_path).resolve() if run.checkpoint.best_model_path else None
    history = module.val_history
    best, embedding, reason = _choose(run)
    test = None
    if run.testing:
        test = _test(run, selected, embedding)
        zero_shot["test"] = zero_shot_test.get(embedding)
    return RunMetrics(
        test=test,
        zero_shot=zero_shot,
        embedding={
            "name": embedding,
            # num_features: timm's plain int attribute, which torch's stub types as Tensor | Module
            "dim": int(module.model.dim if embedding == "head" else cast(int, module.model.backbone.num_features)),
            "chosen_by": reason,
        },
        selected_by=monitor or "last epoch (fixed schedule)",
        selected_epoch=int(best["epoch"]) if monitor and best else int(trainer.current_epoch) - 1,
        val={"best": best, "final": history[-1] if history else None, "history": history},
        checkpoint=str(selected) if selected else None,
        averaging=run.averaging.summary() if run.averaging is not None else None,
        epochs=int(trainer.current_epoch),
        global_steps=int(trainer.global_step),
        images={"train": len(data.train_set or []), "val": len(data.val_set or []), "test": len(data.test_set or [])},
        classes={name: len(classes) for name, classes in data.splits.to_dict().items()},
        train_time_s=round(train_time, 1),
        wall_time_s=round(time.perf_counter() - started, 1),
        resolved={"accelerator": run.accelerator, "precision": run.precision, "world_size": trainer.world_size},
    )


def train(config: TrainConfig) -> Path:
    """Train; pick the epoch on validation classes (or keep the last one); test once; returns the run directory.

    ``metrics.json`` holds zero-shot and final validation/test metrics: the test classes are evaluated
    twice only, before training (zero-shot) and with the selected model, and choose nothing.
    """
    started = time.perf_counter()
    run = _set_up(config)
    zero_shot, zero_shot_test = _zero_shot(run)
    train_time = _fit(run)
    if run.trainer.global_rank == 0:
        metrics = _run_metrics(run, zero_shot, zero_shot_test, train_time, started)
        metrics.write(run.run_dir)
        logger.info(
            "run %s: test R@1 %s → %s (selected: %s, epoch %s), training %.0f s",
            run.run_dir,
            (metrics.zero_shot["test"] or {}).get("recall_at_1"),
            (metrics.test or {}).get("recall_at_1"),
            metrics.selected_by,
            metrics.selected_epoch,
            train_time,
        )
    return run.run_dir


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
