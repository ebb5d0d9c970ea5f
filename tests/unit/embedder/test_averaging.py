"""carsearch.embedder.training.averaging: the EMA and the mean of the last epochs, on a toy model whose every
step is recorded, and through a real (tiny) training run into its checkpoint and export."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from carsearch.embedder import load_checkpoint
from carsearch.embedder.training import export, load_train_config, train
from carsearch.embedder.training.averaging import StepAveraging
from carsearch.errors import ConfigError
from tests.unit.embedder.test_training import TINY, make_hue_gallery

STEPS, EPOCHS = 5, 4


class Toy(L.LightningModule):
    """One weight vector pulled towards each batch's target: every step moves it, differently."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.after_step: list[torch.Tensor] = []
        self.validated: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weights seen, current weights)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return ((self.w - batch[0]) ** 2).sum()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.after_step.append(self.w.detach().clone())  # runs before the callbacks' hook: the raw step

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append((self.w.detach().clone(), self.after_step[-1].clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def fit(averaging: StepAveraging) -> Toy:
    torch.manual_seed(0)
    targets = TensorDataset(torch.randn(STEPS, 3) * 3)
    model = Toy()
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        callbacks=[averaging],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(targets, batch_size=1, shuffle=True)
    trainer.fit(model, loader, DataLoader(targets, batch_size=1))
    return model


def test_mean_of_the_last_epochs_averages_every_step_of_them_and_validates_current_weights_before():
    averaging = StepAveraging(last_epochs=2)
    model = fit(averaging)
    steps = torch.stack(model.after_step)
    assert len(steps) == STEPS * EPOCHS and averaging.first_step == STEPS * (EPOCHS - 2)
    expected = steps[STEPS * (EPOCHS - 2) :].mean(dim=0)
    torch.testing.assert_close(model.w.detach(), expected)  # the trained model ends as the average
    assert not torch.allclose(expected, steps[-1], atol=1e-3)  # ... which is not the last step's weights
    assert averaging.updates == 2 * STEPS and averaging.summary()["kind"] == "last_epochs"
    seen, current = zip(*model.validated, strict=True)
    for epoch in range(EPOCHS - 2):  # no average yet: validation sees the current weights
        torch.testing.assert_close(seen[epoch], current[epoch])
    for epoch in range(EPOCHS - 2, EPOCHS):  # then the average of the steps so far
        stop = STEPS * (epoch + 1)
        torch.testing.assert_close(seen[epoch], steps[STEPS * (EPOCHS - 2) : stop].mean(dim=0))


def test_ema_has_its_half_life_in_epochs():
    averaging = StepAveraging(ema_half_life=1.5)
    model = fit(averaging)
    decay = 0.5 ** (1 / (1.5 * STEPS))
    assert averaging.decay == pytest.approx(decay)
    steps = model.after_step
    ema = steps[0]
    for weights in steps[1:]:
        ema = decay * ema + (1 - decay) * weights
    torch.testing.assert_close(model.w.detach(), ema)
    assert averaging.updates == STEPS * EPOCHS
    assert averaging.summary() == {"kind": "ema", "half_life_epochs": 1.5, "decay": decay, "updates": STEPS * EPOCHS}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.ema_half_life=2", "trainer.average_last_epochs=3"], "not both"),
        (["trainer.ema_half_life=0"], "must be > 0"),
        (["trainer.max_epochs=4", "trainer.average_last_epochs=5"], "between 1 and trainer.max_epochs"),
    ],
)
def test_averaging_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_a_run_checkpoints_tests_and_exports_the_averaged_weights(tmp_path):
    gallery = make_hue_gallery(tmp_path / "gallery", classes=12, per_class=6)
    overrides = [*TINY, f"data.source={gallery}", "data.batches_per_epoch=4", "trainer.max_epochs=2"]
    overrides += ["trainer.average_last_epochs=1", "model.embed_with=pooled", f"out.dir={tmp_path}", "out.name=avg"]
    run = train(load_train_config(None, overrides))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["averaging"] == {"kind": "last_epochs", "epochs": 1, "first_step": 4, "updates": 4}
    saved = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)
    averaged, last = saved["state_dict"], saved["current_model_state"]
    moved = [k for k, v in averaged.items() if v.is_floating_point() and not torch.equal(v, last[k])]
    assert moved  # the checkpoint holds the average, not the last step
    out = export(run, tmp_path / "avg.pt")
    exported = load_checkpoint(out).state_dict()
    for key, value in exported.items():
        if key.startswith("backbone."):
            torch.testing.assert_close(value, averaged[f"model.{key}"])
