"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file, then atomically replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def jsonl_line(row: dict[str, Any]) -> bytes:
    """One JSON-lines row as written everywhere in the project (sorted keys, newline-terminated)."""
    return (json.dumps(row, sort_keys=True) + "\n").encode()


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    def write(handle: BinaryIO) -> None:
        for row in rows:
            handle.write(jsonl_line(row))

    atomic_write(path, write)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a missing file is empty."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_all(moves: Iterable[tuple[Path, Path]]) -> None:
    """Rename each (staged, target) pair in turn, back to back, then make the renames durable.

    Files written and synced in advance (e.g. by :func:`atomic_write` to staging names) are swapped in within
    microseconds, so a reader that checks the group's stamps around its read sees either all old or all new.
    """
    folders: set[Path] = set()
    for staged, target in moves:
        os.replace(staged, target)
        folders.add(Path(target).parent)
    for folder in folders:
        _fsync_dir(folder)
