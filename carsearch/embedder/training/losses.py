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
    """A PML loss and its optional miner, and ``plus``: a second loss (no miner) added with ``plus_weight``.
    A loss has parameters iff it is a proxy/classification loss."""

    loss: losses.BaseMetricLossFunction
    miner: miners.BaseMiner | None
    name: str
    miner_name: str
    plus: losses.BaseMetricLossFunction | None = None
    plus_weight: float = 1.0
    memory: losses.CrossBatchMemory | None = None  # loss.memory: its own loss and miner over the memory
    memory_weight: float = 1.0


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


def build_loss(
    name: str, params: dict[str, Any], num_classes: int, embedding_size: int
) -> losses.BaseMetricLossFunction:
    """The PML loss :data:`~carsearch.embedder.training.registry.LOSSES` names, proxy losses sized by
    ``num_classes`` × ``embedding_size``."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    entry = LOSSES[name]
    kwargs = dict(params)
    if entry.proxies:
        if num_classes < 2:
            raise ConfigError(f"loss {name} needs at least 2 training classes, got {num_classes}")
        kwargs.update(num_classes=num_classes, embedding_size=embedding_size)
    return _construct(getattr(losses, entry.pml_class), f"loss {name}", kwargs)


def build_criterion(config: LossConfig, num_classes: int, embedding_size: int) -> Criterion:
    """The configured loss (+ miner) and ``loss.plus``. ``num_classes``/``embedding_size`` size proxy and
    class-weight losses."""
    params = dict(config.params)
    if config.margin is not None:
        params["margin"] = config.margin
    loss = build_loss(config.name, params, num_classes, embedding_size)
    miner_margin = config.margin if config.name == "triplet" else None
    miner = build_miner(config.miner_name, miner_margin, config.miner_params)
    plus = None if config.plus is None else build_loss(config.plus, config.plus_params, num_classes, embedding_size)
    name = config.name if config.plus is None else f"{config.name}+{config.plus}"
    memory = None
    if config.memory:
        memory = losses.CrossBatchMemory(
            build_loss(config.name, params, num_classes, embedding_size),
            embedding_size,
            memory_size=config.memory,
            miner=build_miner(config.miner_name, miner_margin, config.miner_params),
        )
        name += f"+xbm{config.memory}"
    return Criterion(
        loss,
        miner,
        name,
        config.miner_name,
        plus=plus,
        plus_weight=config.plus_weight,
        memory=memory,
        memory_weight=config.memory_weight,
    )


def mined_count(miner: miners.BaseMiner | None) -> int | None:
    """Tuples the miner kept in its last call: triplets, or positive + negative pairs; None without a miner."""
    if miner is None:
        return None
    if getattr(miner, "num_triplets", 0):
        return int(miner.num_triplets)
    return int(getattr(miner, "num_pos_pairs", 0)) + int(getattr(miner, "num_neg_pairs", 0))
