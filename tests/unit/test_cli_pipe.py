"""Output piped into a reader that stops early (``carsearch evaluate IDX | head -1``) ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from carsearch.config import IndexConfig, load_config
from carsearch.config_files import to_dict
from carsearch.index import GalleryIndex
from tests.conftest import TEST_OVERRIDES
from tests.unit.index.test_gallery import IDENTITY, records, unit_vectors

REPO = str(Path(__file__).resolve().parents[2])


def test_a_closed_stdout_pipe_ends_quietly_without_a_traceback(tmp_path: Path) -> None:
    manifest = {"embedder": IDENTITY, "config": to_dict(load_config(None, TEST_OVERRIDES))}
    GalleryIndex.from_arrays(unit_vectors(30), records(30), manifest, IndexConfig(use_gpu=False)).save(tmp_path / "idx")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "carsearch.cli", "evaluate", str(tmp_path / "idx")]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None
    job.stdout.close()  # the reader is gone before the first line is written, as `| head` soon after
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 141, stderr.decode()  # 128 + SIGPIPE, as a shell reports `yes | head -1`
    assert stderr.decode() == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Recall@1" in done.stdout, done.stderr  # with a reader, the metrics
