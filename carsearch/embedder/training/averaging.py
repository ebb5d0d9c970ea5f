"""Weight averaging over optimiser steps, on Lightning's ``WeightAveraging``: an EMA, or the plain mean of
the weights over the last epochs (SWA-style, on the recipe's own schedule).

Rules: the average is updated after every optimiser step (from the first one for the EMA, from the first
step of the last ``last_epochs`` epochs for the mean); once it holds an update, validation, the saved
checkpoints, the run's test evaluation and so the export see the averaged weights; before that, the current
ones. Buffers are averaged with the weights (frozen BatchNorm statistics stay what they are). The EMA's
half-life is given in epochs, so one setting means the same on 49 classes as on 98.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging


class StepAveraging(WeightAveraging):
    """An EMA of the weights with a half-life of ``ema_half_life`` epochs, or (``last_epochs``) the mean of
    the weights after every step of the last ``last_epochs`` epochs. Exactly one of the two is set."""

    def __init__(self, *, ema_half_life: float | None = None, last_epochs: int | None = None) -> None:
        if (ema_half_life is None) == (last_epochs is None):
            raise ValueError("StepAveraging takes exactly one of ema_half_life and last_epochs")
        if ema_half_life is not None and not ema_half_life > 0:
            raise ValueError("ema_half_life must be > 0 epochs")
        if last_epochs is not None and last_epochs < 1:
            raise ValueError("last_epochs must be >= 1")
        self.ema_half_life = ema_half_life
        self.last_epochs = last_epochs
        self.decay = 0.0  # the EMA's per-step decay, set when training starts (it needs the steps per epoch)
        self.first_step = 0
        super().__init__(use_buffers=True, avg_fn=self._ema if ema_half_life is not None else None)

    def _ema(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return averaged + (current - averaged) * (1.0 - self.decay)

    @property
    def updates(self) -> int:
        """How many steps the average holds (0 before the first update)."""
        model = self._average_model
        return int(model.n_averaged.item()) if model is not None else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        steps = int(batches) if math.isfinite(batches) and batches > 0 else 1  # one optimiser step per batch
        if self.ema_half_life is not None:
            self.decay = 0.5 ** (1.0 / (self.ema_half_life * steps))
        else:
            assert self.last_epochs is not None
            self.first_step = max(0, (int(trainer.max_epochs or 1) - self.last_epochs) * steps)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.first_step

    # Until the first update the average is the initial model: validation and checkpoints keep the current one.
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.updates:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates:
            super().on_train_end(trainer, pl_module)

    def summary(self) -> dict[str, Any]:
        """What metrics.json records of the averaging."""
        if self.ema_half_life is not None:
            return {"kind": "ema", "half_life_epochs": self.ema_half_life, "decay": self.decay, "updates": self.updates}
        return {
            "kind": "last_epochs",
            "epochs": self.last_epochs,
            "first_step": self.first_step,
            "updates": self.updates,
        }
