"""The Lightning module: an EmbeddingModel trained with a PML loss, validated by retrieval on unseen classes."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from timm.models import group_modules
from torch import nn

from carsearch.config_files import to_dict
from carsearch.embedder.model import EmbeddingModel, ModelSpec
from carsearch.embedder.training.config import LossConfig, ModelConfig, OptimConfig
from carsearch.embedder.training.losses import build_criterion, mined_count
from carsearch.errors import ConfigError
from carsearch.metrics import leave_one_out_metrics

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

logger = logging.getLogger(__name__)

FeatureKind = Literal["head", "pooled"]  # what a trained model embeds with: the head's output or the features before it


def freeze_backbone(backbone: nn.Module, blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first ``blocks`` blocks (timm's coarse parameter groups); -1: everything.

    Returns the frozen modules, which must also stay in eval mode (BatchNorm statistics).
    """
    if blocks == 0:
        return []
    if blocks < 0:
        modules = [backbone]
    else:
        matcher = getattr(backbone, "group_matcher", None)
        if matcher is None:
            raise ConfigError(f"{type(backbone).__name__} has no timm group_matcher; use model.freeze_blocks=0 or -1")
        groups = group_modules(backbone, matcher(coarse=True))
        ordered = [groups[key] for key in sorted(groups)]  # [stem, block 0, block 1, ...]
        if blocks >= len(ordered):
            raise ConfigError(
                f"model.freeze_blocks={blocks} but the backbone has {len(ordered) - 1} blocks; "
                f"use at most {len(ordered) - 2}, or -1 to freeze the whole backbone"
            )
        lookup = dict(backbone.named_modules())
        modules = [lookup[name] for group in ordered[: blocks + 1] for name in group]
    for module in modules:
        module.requires_grad_(False)
    return modules


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0, hold: int = 0) -> float:
    """LR multiplier: constant for ``hold`` steps (frozen warm-up), then a linear warm-up over ``warmup``
    steps, then cosine from 1 to ``floor`` at step ``total``."""
    if step < hold:
        return 1.0
    step, total = step - hold, total - hold
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_split(named: Sequence[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters: norm scales/shifts and biases (1-d tensors) get no decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in named:
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return decay, no_decay


class EmbedderModule(L.LightningModule):
    """Trains ``self.model`` (an :class:`EmbeddingModel`) with a PML loss; logs ``val/recall_at_1`` etc.

    Batches: ``(images (B, 3, S, S), class indices (B,), item indices (B,))``. Under DDP the loss and miner
    are wrapped with PML's distributed wrappers (the loss sees every rank's embeddings) and validation
    embeddings are gathered from all ranks.
    """

    def __init__(
        self,
        spec: ModelSpec,
        num_classes: int,
        model: ModelConfig | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        micro_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model or ModelConfig()
        self.loss_config = loss or LossConfig()
        self.optim_config = optim or OptimConfig()
        self.micro_batch = micro_batch
        # Plain data only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "spec": spec.to_dict(),
                "num_classes": num_classes,
                "model": to_dict(self.model_config),
                "loss": to_dict(self.loss_config),
                "optim": to_dict(self.optim_config),
            }
        )
        self.model = EmbeddingModel(spec, pretrained=self.model_config.pretrained)
        self._frozen = tuple(freeze_backbone(self.model.backbone, self.model_config.freeze_blocks))
        if self.model_config.freeze_bn:
            self._frozen += tuple(m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self._backbone_trainable = tuple(p for p in self.model.backbone.parameters() if p.requires_grad)
        if self.model_config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        criterion = build_criterion(self.loss_config, num_classes, self.model.dim)
        self.criterion = criterion.loss
        self.miner = criterion.miner
        self.plus_criterion = criterion.plus  # loss.plus, added with loss.plus_weight (None: no second loss)
        self.plus_weight = criterion.plus_weight
        self.memory = criterion.memory  # loss.memory (None: off); in use from the first backbone epoch
        self.memory_weight = criterion.memory_weight
        # called in compute_loss; a tuple, so not registered twice (distribute swaps in PML's wrappers)
        self._fns: tuple[nn.Module, nn.Module | None, nn.Module | None] = (
            self.criterion,
            self.miner,
            self.plus_criterion,
        )
        self._world_size = 1
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []
        self.val_history: list[dict[str, float]] = []
        self.train()  # Lightning keeps the modes it finds: frozen blocks start (and stay) in eval mode

    # ------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, D) L2-normalised embeddings, computed ``micro_batch`` images at a time if set.

        Chunks keep activations cache-sized on CPU, which makes a step faster (docs/training.md); the
        loss still sees the whole batch. With BatchNorm in training mode each chunk has its own statistics.
        """
        return self.model.embed_features(self.pooled(images))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, C) pooled backbone features (before the head), ``micro_batch`` images at a time."""
        if self.model_config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.micro_batch is None or len(images) <= self.micro_batch:
            return self.model.features(images)
        return torch.cat([self.model.features(chunk) for chunk in images.split(self.micro_batch)])

    def train(self, mode: bool = True) -> EmbedderModule:
        super().train(mode)
        for module in self._frozen:
            module.eval()  # frozen blocks (and, with freeze_bn, every BatchNorm) keep their statistics
        return self

    def _backbone_learns(self) -> bool:
        return self.current_epoch >= self.optim_config.frozen_warmup_epochs

    def on_train_epoch_start(self) -> None:
        """Frozen warm-up: the backbone learns only from epoch ``optim.frozen_warmup_epochs`` on."""
        learn = self._backbone_learns()
        for parameter in self._backbone_trainable:
            parameter.requires_grad_(learn)

    # ------------------------------------------------------------------ loss
    def distribute(self, world_size: int) -> None:
        """Wrap the losses and the miner with PML's distributed wrappers (call inside an initialised process group).

        The wrapped loss is ``world_size`` × the loss of the gathered batch, so that DDP's gradient average
        gives the single-process gradient for the model; loss parameters (proxies), which see the whole
        batch on every rank, get their gradient divided by ``world_size`` to match too.
        """
        if world_size <= 1 or self._world_size == world_size:
            return
        if self.memory is not None:
            raise ConfigError("loss.memory (a cross-batch memory) trains in one process; set loss.memory=0")
        if self._world_size != 1:
            raise RuntimeError(f"module already distributed over {self._world_size} processes")
        loss = DistributedLossWrapper(self.criterion)
        miner = DistributedMinerWrapper(self.miner) if self.miner is not None else None
        plus = DistributedLossWrapper(self.plus_criterion) if self.plus_criterion is not None else None
        self._fns = (loss, miner, plus)
        for parameter in self.loss_parameters():
            parameter.register_hook(lambda grad, w=world_size: grad / w)
        self._world_size = world_size

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Loss of (B, D) embeddings with (B,) class indices (float32, outside autocast), and the mined count:
        the loss on the miner's tuples, + ``plus_weight`` × the plus loss on the whole batch, + in training from
        the first backbone epoch ``memory_weight`` × the loss of the batch against the cross-batch memory."""
        loss_fn, miner_fn, plus_fn = self._fns
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            indices = miner_fn(embeddings, labels) if miner_fn is not None else None
            loss = loss_fn(embeddings, labels, indices)
            if plus_fn is not None:
                loss = loss + self.plus_weight * plus_fn(embeddings, labels)
            if self.memory is not None and self.training and self._backbone_learns():
                loss = loss + self.memory_weight * self.memory(embeddings, labels)
        return loss, mined_count(self.miner)

    def loss_parameters(self) -> list[nn.Parameter]:
        """The losses' own parameters (proxies, class weights), trained at ``optim.loss_lr``."""
        plus = list(self.plus_criterion.parameters()) if self.plus_criterion is not None else []
        return list(self.criterion.parameters()) + plus

    def setup(self, stage: str) -> None:
        self.distribute(self.trainer.world_size)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        loss, mined = self.compute_loss(self(images), labels)
        # Under DDP every rank holds the same gathered-batch loss × world size: log the loss itself.
        size, sync = len(labels), self._world_size > 1
        self.log(
            "train/loss",
            loss.detach() / self._world_size,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=size,
            sync_dist=sync,
        )
        if mined is not None:
            self.log("train/mined", float(mined), on_step=True, on_epoch=True, batch_size=size, sync_dist=sync)
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers returns one optimizer
        for group in optimizer.param_groups:
            if not group["name"].endswith("_no_decay"):
                self.log(f"train/lr_{group['name']}", group["lr"], on_step=True, batch_size=size)
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        images, labels, index = batch
        features = self.pooled(images)
        embeddings = self.model.embed_features(features)
        self._val_outputs.append((embeddings.float(), labels, index, F.normalize(features, dim=1).float()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        embeddings, labels, index, features = (torch.cat(parts) for parts in zip(*self._val_outputs, strict=True))
        self._val_outputs = []
        if self.trainer.world_size > 1:
            # Ranks hold equal-length shards (DistributedSampler pads with repeats): gather, drop the repeats.
            gathered = self.all_gather((embeddings, labels, index, features))
            embeddings, labels, index, features = (t.flatten(0, 1) for t in gathered)
            _, first = np.unique(index.cpu().numpy(), return_index=True)
            embeddings, labels, features = embeddings[first], labels[first], features[first]
        names = labels.cpu().tolist()
        metrics = leave_one_out_metrics(embeddings.cpu().numpy(), names).flat()
        if not isinstance(self.model.head, nn.Identity):
            # The pooled features before the head: model.embed_with=auto exports whichever scores higher.
            pooled = leave_one_out_metrics(features.cpu().numpy(), names).flat(("recall_at_1", "map_at_r"))
            metrics.update({f"pooled_{name}": value for name, value in pooled.items()})
        self.val_history.append({"epoch": int(self.current_epoch), **metrics})
        self.log_dict(
            {f"val/{name}": value for name, value in metrics.items()},
            prog_bar=False,
            sync_dist=self.trainer.world_size > 1,  # identical on every rank; avoids Lightning's warning
        )

    @torch.no_grad()
    def evaluate(
        self,
        loader: Iterable[Sequence[torch.Tensor]],
        class_names: Sequence[str] | None = None,
        embeddings: Sequence[FeatureKind] = ("head",),
    ) -> dict[FeatureKind, dict[str, float]]:
        """Leave-one-out retrieval metrics of this model on ``loader``'s images (one process, eval mode), for
        each of ``embeddings`` (the head's output, the pooled features before it) from one backbone pass.

        ``class_names[i]`` names class index i (labels with a trailing year add ``other_year_share``).
        """
        was_training = self.training
        self.eval()
        parts: dict[FeatureKind, list[torch.Tensor]] = {name: [] for name in embeddings}
        labels: list[int] = []
        try:
            for batch in loader:
                features = self.pooled(batch[0].to(self.device))
                for name in embeddings:
                    vectors = self.model.embed_features(features) if name == "head" else F.normalize(features, dim=1)
                    parts[name].append(vectors.float().cpu())
                labels += batch[1].tolist()
        finally:
            self.train(was_training)
        names = [class_names[i] for i in labels] if class_names is not None else labels
        return {name: leave_one_out_metrics(torch.cat(parts[name]).numpy(), names).flat() for name in embeddings}

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone, head and loss groups (``name`` keys); norm and bias parameters without weight decay."""
        cfg = self.optim_config
        head_lr = cfg.head_lr or cfg.lr
        groups: list[dict[str, Any]] = []
        for name, module, lr in (("backbone", self.model.backbone, cfg.lr), ("head", self.model.head, head_lr)):
            named = list(module.named_parameters())
            if name == "head":
                named += list(self.model.pool.named_parameters())  # GeM's exponent trains with the head
            decay, no_decay = decay_split(named)
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": name})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"})
        loss_params = self.loss_parameters()
        if loss_params:
            groups.append({"params": loss_params, "lr": cfg.loss_lr, "weight_decay": 0.0, "name": "loss"})
        if not groups:
            raise ConfigError("nothing to train: the backbone is frozen and there is no head (set model.embedding_dim)")
        return groups

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        cfg = self.optim_config
        groups = self.param_groups()
        if cfg.name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups)
        elif cfg.name == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        else:
            raise ConfigError(f"unknown optimiser {cfg.name!r}; valid: adamw, sgd")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        hold = min(total, cfg.frozen_warmup_epochs * per_epoch)
        warmup = round(cfg.warmup_epochs * per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, cfg.min_lr_ratio, hold)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
