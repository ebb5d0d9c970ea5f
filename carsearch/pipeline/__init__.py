"""Composition of the stages: batch crop-and-index, search, evaluation."""

from carsearch.pipeline.batch import IndexReport
from carsearch.pipeline.pipeline import Evaluation, Pipeline, evaluate_index
from carsearch.pipeline.sources import SourceItem, read_source

__all__ = ["Evaluation", "IndexReport", "Pipeline", "SourceItem", "evaluate_index", "read_source"]
