"""Where detector weights live: downloads in a cache folder, and a copy inside each index that needs them.

Rules:
- A bare name (``yolo11n.pt``) that is not a file in the working directory is looked up in
  ``cache_root()/detector`` (``$CARSEARCH_CACHE``, else ``~/.cache/carsearch``) and downloaded there by
  ultralytics on first use, never into the working directory.
- An index records its detector weights by name, SHA-256 and size, and keeps a copy of files up to
  :data:`BUNDLE_MAX_BYTES` in ``INDEX/detector/`` so that a moved or copied index still finds them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from carsearch.data import storage

BUNDLE_DIR = "detector"  # inside an index folder
BUNDLE_MAX_BYTES = 64 << 20  # YOLO nano/small weights are 3-20 MB; larger files are referenced, not copied


def cache_dir() -> Path:
    """Where named detector weights are downloaded to and looked up."""
    return storage.cache_root() / "detector"


def is_bare_name(weights: str) -> bool:
    """A file name without a folder (``yolo11n.pt``), as opposed to a path or a URI."""
    return not storage.is_uri(weights) and Path(weights).name == weights and not weights.startswith("~")


def local_target(weights: str) -> str:
    """What to hand ultralytics for ``weights``: a bare name found in the working directory stays as it is;
    otherwise the cache's copy (downloaded there when missing). Paths and URIs are returned unchanged."""
    if not is_bare_name(weights) or Path(weights).exists():
        return weights
    return str(cache_dir() / weights)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass(frozen=True)
class WeightsRecord:
    """The detector weights an index was built with (its manifest's ``detector_weights``).

    ``file``: the copy inside the index (relative to the index folder), or None when too large to copy;
    ``source``: where they were loaded from when the index was built (an absolute path or a URI).
    """

    name: str
    sha256: str
    bytes: int
    source: str
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def describe(local: Path, source: str) -> WeightsRecord:
    """A record of the local weights file ``local`` (loaded from ``source``: a URI is kept, else the file
    itself, e.g. a bare name's copy in the cache), not yet copied anywhere."""
    source = source if storage.is_uri(source) else os.path.abspath(local)
    return WeightsRecord(local.name, sha256_file(local), local.stat().st_size, source)


def bundle(record: WeightsRecord, local: Path, index_dir: Path) -> WeightsRecord:
    """Copy the weights into ``index_dir/detector/`` (atomically; kept when the same bytes are there) unless
    larger than :data:`BUNDLE_MAX_BYTES`; the record, with ``file`` set when copied."""
    if record.bytes > BUNDLE_MAX_BYTES:
        return record
    relative = f"{BUNDLE_DIR}/{record.name}"
    target = index_dir / relative
    if not (target.is_file() and target.stat().st_size == record.bytes and sha256_file(target) == record.sha256):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600: other users of a shared index must read it
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return WeightsRecord(record.name, record.sha256, record.bytes, record.source, relative)


def locate(record: WeightsRecord, index_dir: Path) -> str | None:
    """Where an index's detector weights are now: its own copy when intact, else the original source when it
    still holds the same bytes (a URI is trusted), else None."""
    if record.file is not None:
        copy = index_dir / record.file
        if copy.is_file() and copy.stat().st_size == record.bytes:
            return str(copy.absolute())
    if storage.is_uri(record.source):
        return record.source
    source = Path(record.source)
    if source.is_file() and source.stat().st_size == record.bytes and sha256_file(source) == record.sha256:
        return str(source)
    return None
