"""The cropped-vs-raw experiment: ``compare(...)`` runs the cached stages and writes the report."""

from __future__ import annotations

from pathlib import Path

from carsearch.compare.config import CompareConfig, load_compare_config
from carsearch.compare.experiment import run_compare
from carsearch.compare.report import write_report

__all__ = ["CompareConfig", "compare", "load_compare_config"]


def compare(config: CompareConfig, out: str | Path, command: str = "carsearch compare") -> dict[str, Path]:
    """Run the experiment into ``out`` (re-runs reuse finished stages) and write report.md/.html + results.json."""
    return write_report(config, run_compare(config, out), out, command)
