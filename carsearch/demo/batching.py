"""A small request queue that runs concurrent requests together: one model call per batch, not per request.

Requests arriving while a batch runs wait in the queue; the worker takes the first waiting one, waits up to
``window_s`` for more (at most ``max_batch``) and runs them as one batch. The queue is unbounded: a request
is never dropped, it waits its turn (the callers' own timeouts bound how long).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# run(items) -> one result per item, in order; an exception instance is that item's error
BatchFn = Callable[[Sequence[T]], Sequence["R | BaseException"]]


class Batcher(Generic[T, R]):
    """Runs ``run`` on batches of submitted items in one worker thread (so the models are used by one thread).

    ``max_batch``: the most items per call. ``window_s``: how long the first item of a batch waits for others.
    ``on_idle``: called after a batch when no item waits (e.g. to hand freed memory back to the system).
    """

    def __init__(
        self,
        run: BatchFn,
        max_batch: int = 16,
        window_s: float = 0.01,
        name: str = "batcher",
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run = run
        self.on_idle = on_idle
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches = 0  # batches run so far (tests and logs)
        self.largest = 0  # the largest batch so far
        self._queue: queue.Queue[tuple[T, Future[R]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item``; its future resolves to its result or raises its error."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, item: T, timeout: float | None = None) -> R:
        """Submit and wait for the result."""
        return self.submit(item).result(timeout)

    def close(self) -> None:
        """Finish the queued items, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _gather(self, first: tuple[T, Future[R]]) -> tuple[list[tuple[T, Future[R]]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is None:
                stop = True
                break
            batch.append(entry)
        return batch, stop

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if live:
                self._run([item for item, _ in live], [future for _, future in live])
            if self.on_idle is not None and self._queue.empty():
                try:
                    self.on_idle()
                except Exception:  # noqa: BLE001 - housekeeping must never stop the queue
                    logger.exception("on_idle failed")
            if stop:
                return

    def _run(self, items: list[T], futures: list[Future[R]]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(items))
        try:
            results = list(self.run(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error, the worker lives on
            logger.exception("batch of %d failed", len(items))
            results = [exc] * len(items)
        for future, result in zip(futures, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
