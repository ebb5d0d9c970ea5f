"""Composition of the stages: batch crop-and-index, search, evaluation.

The names below load on first use (PEP 562), so a process that needs one light module of this package —
a Ray decode task unpickling :mod:`carsearch.pipeline.ray_workers` — does not import torch, timm and faiss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from carsearch.lazy import lazy_attributes

if TYPE_CHECKING:
    from carsearch.pipeline.evaluation import ClassGroup, Evaluation, evaluate_index
    from carsearch.pipeline.index_job import IndexReport
    from carsearch.pipeline.pipeline import Pipeline

__all__ = ["ClassGroup", "Evaluation", "IndexReport", "Pipeline", "evaluate_index"]
_HOMES = {
    "ClassGroup": "carsearch.pipeline.evaluation",
    "Evaluation": "carsearch.pipeline.evaluation",
    "IndexReport": "carsearch.pipeline.index_job",
    "Pipeline": "carsearch.pipeline.pipeline",
    "evaluate_index": "carsearch.pipeline.evaluation",
}

__getattr__ = lazy_attributes(__name__, _HOMES)
