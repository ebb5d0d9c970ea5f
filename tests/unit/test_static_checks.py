"""Static checks over the source: mypy (configured in pyproject.toml) and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the type annotations of ``carsearch``: mypy reports no errors and no unused ``type: ignore``."""
    from mypy import api

    monkeypatch.chdir(ROOT)  # mypy reads its settings ([tool.mypy], files = carsearch) from pyproject.toml here
    stdout, stderr, status = api.run([])
    assert status == 0, f"mypy failed:\n{stdout}{stderr}"


def test_ruff_check_passes() -> None:
    """Guards the lint rules of pyproject.toml over the package, the tests and the benchmarks."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "carsearch", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
