"""Run as a script by :class:`carsearch.data.processes.ProcessSweeper` (standard library only, Linux).

``python watchdog.py VARIABLE TOKEN``: every half second it notes the processes whose environment holds
``VARIABLE=TOKEN`` and their descendants; when its standard input closes — its parent exited, however,
``kill -9`` included — it SIGKILLs those still running. Descendants count because some processes (Ray's
agents) overwrite their environment area with their process title, and a killed parent's children are
re-parented away, so they must be seen while their marked parent lives. Unmarked processes outside
those trees (the parent's other children) are never touched.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a running process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def with_descendants(roots: list[int]) -> set[tuple[int, int]]:
    """(pid, start time) of the ``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _stat(int(name))) is not None:
            children.setdefault(info[0], []).append(int(name))
            starts[int(name)] = info[1]
    found = {(pid, starts[pid]) for pid in roots if pid in starts}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, starts[child]))
            todo.append(child)
    return found


def marked_processes(variable: str, token: str) -> list[int]:
    """Pids (not this one) whose initial environment holds ``variable=token``."""
    needle = f"{variable}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone, or not ours
            continue
    return found


def sweep(variable: str, token: str, seen: set[tuple[int, int]], rounds: int = 5) -> int:
    """SIGKILL the marked processes and the ``seen`` ones still running (same start time: not a reused
    pid), a few rounds until none is left; how many were killed."""
    killed = 0
    for _ in range(rounds):
        alive = [pid for pid, start in seen if (info := _stat(pid)) is not None and info[1] == start]
        pids = set(alive) | set(marked_processes(variable, token))
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.2)
    return killed


def main(argv: list[str]) -> int:
    variable, token = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: outlive it to sweep
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seen: set[tuple[int, int]] = set()
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.5)
        if ready and not os.read(stdin.fileno(), 64):
            break  # the parent closed the pipe, or died
        seen |= with_descendants(marked_processes(variable, token))
    sweep(variable, token, seen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
