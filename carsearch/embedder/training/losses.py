"""Loss and miner by name: one small factory over the pytorch-metric-learning classes of the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytorch_metric_learning import losses, miners
from torch import nn

from carsearch.embedder.training.config import LossConfig
from carsearch.embedder.training.registry import LOSSES, MINERS
from carsearch.errors import ConfigError


@dataclass
class Criterion:
    """A PML loss and its optional miner; ``loss`` has parameters iff it is a proxy/classification loss."""

    loss: losses.BaseMetricLossFunction
    miner: miners.BaseMiner | None
    name: str
    miner_name: str


def _construct(cls: type[nn.Module], what: str, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}: bad parameters {sorted(kwargs)} for {cls.__name__}: {exc}") from None


def build_miner(
    name: str, margin: float | None = None, params: dict[str, Any] | None = None
) -> miners.BaseMiner | None:
    """The miner :data:`~carsearch.embedder.training.registry.MINERS` names (``none`` → None); ``margin`` is
    used by the miners that share the triplet loss's margin unless ``params`` sets one."""
    if name not in MINERS:
        raise ConfigError(f"unknown miner {name!r}; valid miners: {', '.join(MINERS)}")
    entry = MINERS[name]
    if entry is None:
        return None
    kwargs = {**entry.kwargs, **(params or {})}
    if entry.shares_margin and margin is not None:
        kwargs.setdefault("margin", margin)
    return _construct(getattr(miners, entry.pml_class), f"loss.miner={name}", kwargs)


def build_criterion(config: LossConfig, num_classes: int, embedding_size: int) -> Criterion:
    """The configured loss (+ miner). ``num_classes``/``embedding_size`` size proxy and class-weight losses."""
    entry = LOSSES[config.name]  # the config has checked the names and which options apply
    kwargs = dict(config.params)
    if config.margin is not None:
        kwargs["margin"] = config.margin
    if entry.proxies:
        if num_classes < 2:
            raise ConfigError(f"loss {config.name} needs at least 2 training classes, got {num_classes}")
        kwargs.update(num_classes=num_classes, embedding_size=embedding_size)
    loss = _construct(getattr(losses, entry.pml_class), f"loss.name={config.name}", kwargs)
    miner_margin = config.margin if config.name == "triplet" else None
    miner = build_miner(config.miner_name, miner_margin, config.miner_params)
    return Criterion(loss=loss, miner=miner, name=config.name, miner_name=config.miner_name)


def mined_count(miner: miners.BaseMiner | None) -> int | None:
    """Tuples the miner kept in its last call: triplets, or positive + negative pairs; None without a miner."""
    if miner is None:
        return None
    if getattr(miner, "num_triplets", 0):
        return int(miner.num_triplets)
    return int(getattr(miner, "num_pos_pairs", 0)) + int(getattr(miner, "num_neg_pairs", 0))
