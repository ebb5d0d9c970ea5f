"""One writer at a time on a folder: an exclusive ``flock`` on ``FOLDER/.writer.lock`` that names its holder.

Rules:
- The lock is the kernel's (``fcntl.flock``), so it goes when the holding process dies, however it dies
  (``kill -9`` included): a killed job never leaves a stuck lock and nothing has to be cleaned by hand.
  (Not the ``filelock`` package: its ``FileLock`` falls back to a marker file where ``flock`` is missing,
  and a marker file outlives a killed process.)
- A second writer refuses at once (:class:`~carsearch.errors.IndexBusyError`) and names the holder: its pid,
  host and start time, which the holder writes into the lock file once it holds the lock and clears on
  release. What a killed holder left there is overwritten by the next holder before anyone can read it as
  current; a reader of the file only believes a pid that is still running on this host.
- Processes forked while the lock is held (decode workers) close their copy of it, so only the writer holds
  it and a straggling worker never keeps it after the writer is gone.
- Readers never take it: they see the last committed state (``GalleryIndex.load``).
- Where ``flock`` is unavailable (Windows, some network filesystems) writing goes on unlocked, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from carsearch.errors import IndexBusyError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
READ_HOLDER_SECONDS = 1.0  # how long a refused writer waits for the holder's line (written just after locking)

_held: set[WriterLock] = set()
_fork_hook = False


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: a process on a host since a local time (``YYYY-MM-DD HH:MM:SS``)."""

    pid: int
    host: str
    started: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def parse(cls, text: bytes) -> Holder | None:
        """The holder written in a lock file; None for an empty or half-written one."""
        try:
            fields = json.loads(text)
            return cls(int(fields["pid"]), str(fields["host"]), str(fields["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def running(self) -> bool:
        """False only for a pid of this host that no longer runs (a killed holder's leftover line)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: running
            pass
        return True


class WriterLock:
    """The exclusive writer lock of ``folder``: :meth:`acquire` (never waits), :meth:`release` (idempotent),
    or ``with WriterLock(folder).acquire():``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WriterLock:
        """Take the lock, or raise :class:`IndexBusyError` naming the process that holds it."""
        if self._fd is not None:
            return self
        if fcntl is None:
            logger.warning("%s: no flock on this platform; make sure no other job writes it", self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.pid} on {holder.host}, started {holder.started}" if holder else "pid unknown"
            raise IndexBusyError(
                f"{self.folder} is being written by another carsearch job ({who}); wait for it to finish, "
                "then re-run this command"
            ) from None
        except OSError as exc:  # ENOLCK, ENOSYS...: a filesystem without flock
            os.close(fd)
            logger.warning("%s: cannot lock (%s); make sure no other job writes it", self.folder, exc)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(Holder.this_process())) + "\n").encode(), 0)
        self._fd = fd
        _held.add(self)
        _close_in_forked_children()
        return self

    def release(self) -> None:
        """Clear the holder line and let the next writer in (unlocked explicitly: a process forked a moment
        ago may not have closed its copy yet)."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> Holder | None:
    """The running holder's line; waits briefly for a holder that has locked but not yet written it."""
    deadline = time.monotonic() + READ_HOLDER_SECONDS
    while True:
        holder = Holder.parse(os.pread(fd, 4096, 0))
        if holder is not None and holder.running():
            return holder
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _forget_in_child() -> None:
    for lock in list(_held):
        if lock._fd is not None:
            os.close(lock._fd)  # the parent's description keeps the lock
        lock._fd = None
    _held.clear()


def _close_in_forked_children() -> None:
    global _fork_hook
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_hook = True
