"""Losses and miners by name, each defined once (PML's one class per concept, named as timm names models).

The training config validates ``loss.name`` / ``loss.miner`` against these tables and
:func:`carsearch.embedder.training.losses.build_criterion` builds from them; this module imports neither
pytorch-metric-learning nor the config, so both can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LossEntry:
    """A ``pytorch_metric_learning.losses`` class and how the config drives it."""

    pml_class: str
    proxies: bool = False  # owns proxies / class weights: sized by the class count, trained at optim.loss_lr
    margin: bool = False  # takes ``margin`` (loss.margin); the others are tuned through loss.params only
    miner: str = "none"  # the miner when loss.miner is null


@dataclass(frozen=True)
class MinerEntry:
    """A ``pytorch_metric_learning.miners`` class, its fixed keyword arguments, and whether the triplet loss's
    margin is its margin too."""

    pml_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    shares_margin: bool = False


LOSSES: dict[str, LossEntry] = {
    "triplet": LossEntry("TripletMarginLoss", margin=True, miner="semihard"),
    "arcface": LossEntry("ArcFaceLoss", proxies=True, margin=True),
    "subcenter_arcface": LossEntry("SubCenterArcFaceLoss", proxies=True, margin=True),
    "proxy_anchor": LossEntry("ProxyAnchorLoss", proxies=True, margin=True),
    "multi_similarity": LossEntry("MultiSimilarityLoss", miner="multi_similarity"),
    "contrastive": LossEntry("ContrastiveLoss"),
}

# "none": no miner (proxy losses must use it: they learn from proxies, not mined tuples).
MINERS: dict[str, MinerEntry | None] = {
    "none": None,
    "hard": MinerEntry("BatchHardMiner"),
    "semihard": MinerEntry("TripletMarginMiner", {"type_of_triplets": "semihard"}, shares_margin=True),
    "all": MinerEntry("TripletMarginMiner", {"type_of_triplets": "all"}, shares_margin=True),
    "multi_similarity": MinerEntry("MultiSimilarityMiner"),
}
