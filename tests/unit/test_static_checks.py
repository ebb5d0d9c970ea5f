"""Static checks over the source: mypy and ruff (configured in pyproject.toml), and function length."""

from __future__ import annotations

import ast
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


MAX_FUNCTION_LINES = 80


def long_functions(root: Path, limit: int) -> dict[str, int]:
    """``{"<path>::<qualified name>": lines}`` of every function in ``root``'s package longer than ``limit`` lines
    (``def`` line to last line; decorators not counted)."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found[f"{path}::{name}"] = lines
                name += "."
            visit(child, path, name)

    for file in sorted((root / "carsearch").rglob("*.py")):
        visit(ast.parse(file.read_text(), str(file)), file.relative_to(root).as_posix(), "")
    return found


def test_no_function_is_longer_than_80_lines() -> None:
    """Short functions that say what they do: none in ``carsearch`` over 80 lines."""
    too_long = long_functions(ROOT, MAX_FUNCTION_LINES)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {too_long}"
