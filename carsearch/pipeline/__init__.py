"""Composition of the stages: batch crop-and-index, search, evaluation.

The names below load on first use (PEP 562), so a process that needs one light module of this package —
a Ray decode task unpickling :mod:`carsearch.pipeline.ray_workers` — does not import torch, timm and faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carsearch.pipeline.batch import IndexReport
    from carsearch.pipeline.pipeline import ClassGroup, Evaluation, Pipeline, evaluate_index

__all__ = ["ClassGroup", "Evaluation", "IndexReport", "Pipeline", "evaluate_index"]
_HOMES = {
    "ClassGroup": "carsearch.pipeline.pipeline",
    "Evaluation": "carsearch.pipeline.pipeline",
    "IndexReport": "carsearch.pipeline.batch",
    "Pipeline": "carsearch.pipeline.pipeline",
    "evaluate_index": "carsearch.pipeline.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
