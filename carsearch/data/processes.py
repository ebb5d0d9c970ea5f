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
