"""The search queue: concurrent requests run together, each gets its own result or error, none is dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from carsearch.demo.batching import Batcher


def test_concurrent_requests_run_in_batches_and_each_gets_its_own_result() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(items: Sequence[int]) -> list[int | BaseException]:
        gate.wait(5)  # the first batch holds the worker while the others queue up
        calls.append(list(items))
        return [ValueError(f"odd {i}") if i % 7 == 6 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run, max_batch=8, window_s=0.01)
    with ThreadPoolExecutor(max_workers=30) as pool:
        futures = [pool.submit(batcher.submit, i) for i in range(30)]
        time.sleep(0.2)
        gate.set()
        submitted = [f.result() for f in futures]
    results = {}
    for i, future in enumerate(submitted):
        try:
            results[i] = future.result(10)
        except ValueError as exc:
            results[i] = str(exc)
    assert results == {i: (f"odd {i}" if i % 7 == 6 else i * 10) for i in range(30)}
    assert sorted(i for batch in calls for i in batch) == list(range(30))  # each item ran once
    assert max(len(batch) for batch in calls) == 8 and len(calls) <= 6  # batched, never above max_batch
    assert batcher.largest == 8
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    def run(items: Sequence[str]) -> list[str]:
        if "boom" in items:
            raise RuntimeError("model crashed")
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(run, max_batch=1)
    with pytest.raises(RuntimeError, match="model crashed"):
        batcher("boom", timeout=5)
    assert batcher("fine", timeout=5) == "FINE"
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("late")
