"""Loss and miner by name: one small factory over pytorch-metric-learning classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytorch_metric_learning import losses, miners
from torch import nn

from carsearch.embedder.training.config import LossConfig
from carsearch.errors import ConfigError

LOSSES: dict[str, type[losses.BaseMetricLossFunction]] = {
    "triplet": losses.TripletMarginLoss,
    "arcface": losses.ArcFaceLoss,
    "subcenter_arcface": losses.SubCenterArcFaceLoss,
    "proxy_anchor": losses.ProxyAnchorLoss,
    "multi_similarity": losses.MultiSimilarityLoss,
    "contrastive": losses.ContrastiveLoss,
}
# Losses that own parameters (class weights or proxies): they need num_classes and embedding_size.
PROXY_LOSSES = frozenset({"arcface", "subcenter_arcface", "proxy_anchor"})
# Losses whose constructor takes ``margin``; the others are tuned through ``loss.params``.
MARGIN_LOSSES = frozenset({"triplet", "arcface", "subcenter_arcface", "proxy_anchor"})
MINERS = ("none", "hard", "semihard", "all", "multi_similarity")
DEFAULT_MINER = {"triplet": "semihard", "multi_similarity": "multi_similarity"}


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
    """``hard`` = BatchHardMiner, ``semihard``/``all`` = TripletMarginMiner, ``multi_similarity``; ``none`` → None."""
    kwargs = dict(params or {})
    if name == "none":
        return None
    if name == "hard":
        return _construct(miners.BatchHardMiner, "loss.miner=hard", kwargs)
    if name in ("semihard", "all"):
        if margin is not None:
            kwargs.setdefault("margin", margin)
        kwargs.setdefault("type_of_triplets", name)
        return _construct(miners.TripletMarginMiner, f"loss.miner={name}", kwargs)
    if name == "multi_similarity":
        return _construct(miners.MultiSimilarityMiner, "loss.miner=multi_similarity", kwargs)
    raise ConfigError(f"unknown miner {name!r}; valid miners: {', '.join(MINERS)}")


def build_criterion(config: LossConfig, num_classes: int, embedding_size: int) -> Criterion:
    """The configured loss (+ miner). ``num_classes``/``embedding_size`` size proxy and class-weight losses."""
    if config.name not in LOSSES:
        raise ConfigError(f"unknown loss {config.name!r}; valid losses: {', '.join(LOSSES)}")
    kwargs = dict(config.params)
    if config.margin is not None:
        if config.name not in MARGIN_LOSSES:
            raise ConfigError(
                f"loss.margin does not apply to {config.name}; set its parameters in loss.params "
                f"(e.g. pos_margin/neg_margin for contrastive, base for multi_similarity)"
            )
        kwargs["margin"] = config.margin
    if config.name in PROXY_LOSSES:
        if num_classes < 2:
            raise ConfigError(f"loss {config.name} needs at least 2 training classes, got {num_classes}")
        kwargs.update(num_classes=num_classes, embedding_size=embedding_size)
    miner_name = config.miner or DEFAULT_MINER.get(config.name, "none")
    if miner_name != "none" and config.name in PROXY_LOSSES:
        raise ConfigError(f"loss {config.name} learns from proxies, not mined tuples; set loss.miner=none")
    loss = _construct(LOSSES[config.name], f"loss.name={config.name}", kwargs)
    miner = build_miner(miner_name, config.margin if config.name == "triplet" else None, config.miner_params)
    return Criterion(loss=loss, miner=miner, name=config.name, miner_name=miner_name)


def mined_count(miner: miners.BaseMiner | None) -> int | None:
    """Tuples the miner kept in its last call: triplets, or positive + negative pairs; None without a miner."""
    if miner is None:
        return None
    if getattr(miner, "num_triplets", 0):
        return int(miner.num_triplets)
    return int(getattr(miner, "num_pos_pairs", 0)) + int(getattr(miner, "num_neg_pairs", 0))
