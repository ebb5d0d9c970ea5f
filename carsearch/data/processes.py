"""Worker processes that die with their parent: no orphans after ``kill -9`` of a job."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int, _worker_id: int = 0) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def die_with_parent() -> Callable[[int], None] | None:
    """A DataLoader ``worker_init_fn`` (call in the parent): on Linux the kernel SIGKILLs each worker when
    the process that started it dies, however it dies.

    torch's own watchdog only notices a dead parent while a worker waits for work; a worker blocked on a
    full result pipe would otherwise live on, holding its memory. Elsewhere: None (torch's watchdog only).
    """
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(_die_with, os.getpid())


class ProcessSweeper:
    """Marks the processes this one starts from now on and kills them when it is gone, however it goes.

    Sets ``variable=<random token>`` in ``os.environ`` (children inherit it) and starts a watchdog process
    (``carsearch/data/watchdog.py``) that keeps noting the marked processes and their descendants and,
    once this process closes its pipe — by :meth:`stop` or by dying, ``kill -9`` included — SIGKILLs
    those still running. Used around a local Ray cluster, some of
    whose processes outlive a killed driver. Anything else this process starts while the sweeper runs is
    marked too: keep it around the job only. Linux (``/proc``) only.
    """

    def __init__(self, variable: str) -> None:
        import secrets
        import subprocess
        from pathlib import Path

        self.variable = variable
        self.token = secrets.token_hex(8)
        script = Path(__file__).with_name("watchdog.py")
        env = {k: v for k, v in os.environ.items() if k != variable}
        self._watchdog = subprocess.Popen(
            [sys.executable, str(script), variable, self.token], stdin=subprocess.PIPE, env=env
        )
        self._previous = os.environ.get(variable)
        os.environ[variable] = self.token

    def stop(self, timeout: float = 30.0) -> None:
        """Kill what is left of the marked processes now and wait for the watchdog to finish."""
        if self._previous is None:
            os.environ.pop(self.variable, None)
        else:
            os.environ[self.variable] = self._previous
        if self._watchdog.stdin is not None:
            self._watchdog.stdin.close()
        self._watchdog.wait(timeout)
