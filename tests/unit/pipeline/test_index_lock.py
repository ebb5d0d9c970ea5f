"""One writer at a time on an index folder: a second job refuses, a killed job leaves no stuck lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from carsearch.config import load_config
from carsearch.data.lock import LOCK_FILE, WriterLock
from carsearch.errors import IndexBusyError, IndexMismatchError
from carsearch.index.records import RecordTable
from carsearch.pipeline import Pipeline
from tests.conftest import CLASS_COLOURS, TEST_OVERRIDES, make_car_image

REPO = str(Path(__file__).resolve().parents[3])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def many_images(root: Path, n: int) -> Path:
    folder = root / "cls"
    folder.mkdir(parents=True)
    for i in range(n):
        make_car_image(i, CLASS_COLOURS[i % 4]).save(folder / f"{i:03d}.jpg")
    return root


def index_command(source: Path, out: Path) -> list[str]:
    overrides = TEST_OVERRIDES + ["runtime.checkpoint_every=1"]
    return [
        *(sys.executable, "-m", "carsearch.cli", "index", str(source), "--out", str(out), "--raw", "--no-progress"),
        *("--batch-size", "4", "--workers", "0", "--device", "cpu", "--json"),
        *sum((["--set", o] for o in overrides), []),
    ]


def indexed_paths(out: Path) -> list[str]:
    return list(RecordTable.read(out / "items.arrow").column("path"))


def test_a_second_writer_is_refused_naming_the_first_until_it_releases(tmp_path: Path) -> None:
    first = WriterLock(tmp_path).acquire()
    with pytest.raises(IndexBusyError) as refused:
        WriterLock(tmp_path).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "wait for it to finish" in message
    first.release()
    first.release()  # idempotent
    with WriterLock(tmp_path) as second:
        assert second.held
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder named


def test_a_dead_holders_line_neither_blocks_nor_is_named(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2020-01-01 00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    lock = WriterLock(tmp_path).acquire()  # a line is no lock: only a live flock is
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def _ready_then_sleep(ready: Any) -> None:
    ready.set()
    time.sleep(30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_forked_workers_do_not_keep_the_lock_of_a_dead_writer(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path).acquire()
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()
    worker = fork.Process(target=_ready_then_sleep, args=(ready,))
    worker.start()  # like a decode worker: forked while the job holds the lock
    try:
        assert ready.wait(30)
        assert lock._fd is not None
        os.close(lock._fd)  # the writer dies (the kernel closes its files; no unlock), its worker lives on
        lock._fd = None
        WriterLock(tmp_path).acquire().release()  # the worker holds no copy of the lock
    finally:
        worker.kill()
        worker.join()


def test_a_job_that_cannot_open_releases_the_lock(tiny_gallery: Path, tmp_path: Path) -> None:
    raw = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false"])
    raw.index(tiny_gallery, tmp_path / "idx")
    WriterLock(tmp_path / "idx").acquire().release()  # finish() let go of it
    other = Pipeline(
        load_config(None, [*TEST_OVERRIDES, "crop=false", "runtime.max_image_side=800"]), embedder=raw.embedder
    )
    with pytest.raises(IndexMismatchError, match="was built with max_image_side=1600"):
        other.index(tiny_gallery, tmp_path / "idx")
    WriterLock(tmp_path / "idx").acquire().release()  # refused after taking the lock: released again


def test_two_jobs_started_together_end_complete_and_the_loser_says_who_won(tmp_path: Path) -> None:
    n = 48
    source, out = many_images(tmp_path / "many", n), tmp_path / "idx"
    jobs = [
        subprocess.Popen(index_command(source, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(job, *job.communicate(timeout=300)) for job in jobs]
    assert sorted(paths := indexed_paths(out)) == sorted(set(paths)) and len(paths) == n
    winners = [(job, stdout) for job, stdout, _ in results if job.returncode == 0]
    assert winners, [stderr for _, _, stderr in results]
    for job, stdout, stderr in results:
        if job.returncode == 0:  # a success reports only what the index keeps
            report = json.loads(stdout)
            assert report["items_in_index"] == n and report["processed"] + report["skipped"] == n
        else:
            assert job.returncode == 2, stderr
            (other,) = [winner for winner, _ in winners]
            (line,) = stderr.strip().splitlines()
            assert f"is being written by another carsearch job (pid {other.pid} on" in line, line


def test_a_killed_writer_leaves_no_stuck_lock_and_the_next_job_resumes(tmp_path: Path) -> None:
    n = 48
    source, out = many_images(tmp_path / "many", n), tmp_path / "idx"
    writer = subprocess.Popen(index_command(source, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "work").glob("chunk-*.npz"))) < 2:
        time.sleep(0.05)
        assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
    with pytest.raises(IndexBusyError, match=f"pid {writer.pid} on"):
        WriterLock(out).acquire()  # what a second job meets while the writer runs
    writer.kill()  # SIGKILL: no finally block runs
    writer.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == writer.pid  # its line is left behind
    done = subprocess.run(index_command(source, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["skipped"] >= 8 and report["skipped"] + report["processed"] == n  # the killed job's chunks kept
    assert sorted(indexed_paths(out)) == sorted({str(p) for p in (source / "cls").glob("*.jpg")})
