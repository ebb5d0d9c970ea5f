"""ProcessSweeper: what a job started is killed when the job dies, even by kill -9, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import kill_9_and_survivors

REPO = str(Path(__file__).resolve().parents[3])

DRIVER = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from carsearch.data.processes import ProcessSweeper

outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # started before: unmarked
sweeper = ProcessSweeper("CARSEARCH_TEST_SWEEP")
# a marked child whose own child starts with an empty environment, as Ray's agents overwrite theirs
grandchild = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env={{}}); time.sleep(60)"
)
child = subprocess.Popen([sys.executable, "-c", grandchild])
print(outsider.pid, child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
def test_kill_9_of_the_job_kills_its_marked_processes_and_their_children_only(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(repo=REPO)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    outsider, child = (int(pid) for pid in proc.stdout.readline().split())
    deadline = time.time() + 20
    while not psutil.Process(child).children() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # the watchdog looks every 0.5 s
    job = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid != outsider]
    assert len(job) >= 3  # watchdog, child, grandchild
    left = kill_9_and_survivors(proc, job, timeout=15)
    assert not left, f"left after kill -9: {left}"
    assert psutil.pid_exists(outsider) and psutil.Process(outsider).status() != psutil.STATUS_ZOMBIE
    os.kill(outsider, signal.SIGKILL)
