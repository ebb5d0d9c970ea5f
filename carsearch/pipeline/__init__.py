"""Composition of the stages: batch crop-and-index, search, evaluation."""

from carsearch.pipeline.batch import IndexReport
from carsearch.pipeline.pipeline import Evaluation, Pipeline, evaluate_index

__all__ = ["Evaluation", "IndexReport", "Pipeline", "evaluate_index"]
