"""Where input files live: local paths, or URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``) read through
pyarrow filesystems, so that every node of a Ray cluster can read a source — and the model files — from an
object store.

A location is a :class:`~pathlib.Path` for a local file and a ``str`` for a URI (``Path`` would collapse
``s3://`` into ``s3:/``). Credentials and endpoints come from pyarrow's usual places: the AWS environment
variables and config files (``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO), or the URI's own
options (``s3://bucket/cars?region=eu-west-1&endpoint_override=host:9000&scheme=http``), which every file
listed under it keeps.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, quote, unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow.fs

Location = Path | str
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # what pyarrow.fs opens
_URI = re.compile(rf"^(?:{'|'.join(SCHEMES)})://", re.IGNORECASE)


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a file in a store pyarrow reads (``s3://...``) rather than a local path.
    Other URLs (``https://``) are not: ultralytics downloads its own weights from them."""
    return isinstance(location, str) and bool(_URI.match(location))


@contextlib.contextmanager
def _store_errors(location: str) -> Iterator[None]:
    """pyarrow's complaints about a URI (ArrowInvalid is a ValueError, ArrowNotImplementedError a
    NotImplementedError) as the ``OSError`` that callers of file functions expect."""
    try:
        yield
    except OSError:
        raise
    except (ValueError, NotImplementedError) as exc:
        raise OSError(f"{location}: {exc}") from None


def as_location(value: str | Path) -> Location:
    """A URI stays a string; anything else becomes a ``Path``."""
    return value if is_uri(value) else Path(value)


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str, pid: int) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of a URI's root and the root's path in it. Keyed by process: a forked worker builds
    its own rather than reusing its parent's connections."""
    from pyarrow.fs import FileSystem

    filesystem, root = FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    return filesystem, root.rstrip("/")


def _split(uri: str) -> SplitResult:
    return urlsplit(uri, allow_fragments=False)  # a '#' is part of an object's name, not a fragment


def _resolve(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    parts = _split(uri)
    with _store_errors(uri):
        filesystem, root = _filesystem(parts.scheme.lower(), parts.netloc, parts.query, os.getpid())
    return filesystem, f"{root}/{unquote(parts.path).lstrip('/')}".rstrip("/") or "/"


def _uri(parts: SplitResult, path: str) -> str:
    """The URI of ``path`` (plain, not percent-encoded) on ``parts``' filesystem, with its options."""
    encoded = quote(path, safe="/:@!$&'()*+,;=~")  # a space, '%', '?' or '#' in a key must survive
    return f"{parts.scheme}://{parts.netloc}{encoded}" + (f"?{parts.query}" if parts.query else "")


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes, from a local path or a URI: every read of a file in carsearch comes here.

    The contract: raises ``OSError`` like ``open``, for a URI too: ``FileNotFoundError`` when it does not
    exist, ``IsADirectoryError`` for a folder, a plain ``OSError`` for a store that cannot be reached or
    refuses, or a malformed URI. :func:`read_failure` says why in words. For images,
    :func:`carsearch.data.images.read_image_bytes` turns the error into ``ImageLoadError``; for content keys,
    :func:`read_bytes_or_empty`.
    """
    if not is_uri(location):
        return Path(location).read_bytes()
    filesystem, path = _resolve(str(location))
    with _store_errors(str(location)):
        try:
            with filesystem.open_input_stream(path) as stream:  # one request; only a failure asks what is there
                return stream.readall()
        except OSError:
            if filesystem.get_file_info(path).type.name == "Directory":
                raise IsADirectoryError(21, "Is a directory", str(location)) from None
            raise


def read_bytes_or_empty(location: str | Path) -> bytes:
    """:func:`read_bytes`, or ``b""`` when the file cannot be read: keys an unreadable file by empty content
    (whoever decodes it later skips it and says why)."""
    try:
        return read_bytes(location)
    except OSError:
        return b""


def read_failure(exc: OSError) -> str:
    """Why a read failed, in words: the system's reason (``No such file or directory``) or the store's message."""
    return exc.strerror or str(exc)


def list_files(root: str) -> list[tuple[str, str]]:
    """Every file below the URI ``root`` as (path relative to it, its URI), sorted by the relative path."""
    from pyarrow.fs import FileSelector, FileType

    parts = _split(root)
    filesystem, base = _resolve(root)
    prefix = unquote(parts.path).rstrip("/")
    found = []
    with _store_errors(root):
        infos = filesystem.get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type == FileType.File:
            relative = posixpath.relpath(info.path, base)
            found.append((relative, _uri(parts, f"{prefix}/{relative}")))
    return sorted(found, key=lambda entry: entry[0].split("/"))  # folder by folder, as a local walk sorts


def parent(location: str | Path) -> Location:
    """The folder holding ``location``."""
    if not is_uri(location):
        return Path(location).parent
    parts = _split(str(location))
    return _uri(parts, posixpath.dirname(unquote(parts.path).rstrip("/")))


def join(folder: str | Path, relative: str) -> Location:
    """``relative`` (a path as a CSV lists it) resolved against ``folder``. A URI in ``relative`` is taken as
    it is; so is an absolute path under a local folder, while under a URI it names a key from the store's
    root (``/cars/a.jpg`` next to ``s3://bucket/lists/x.csv`` is ``s3://bucket/cars/a.jpg``)."""
    if is_uri(relative):
        return relative
    if not is_uri(folder):
        return Path(folder) / relative
    parts = _split(str(folder))
    return _uri(parts, posixpath.normpath(posixpath.join(unquote(parts.path) or "/", relative)))


def _plain_path(location: str | Path) -> str:
    return unquote(_split(str(location)).path) if is_uri(location) else str(location)


def name(location: str | Path) -> str:
    """The file name (last path part) of a local path or a URI."""
    return posixpath.basename(_plain_path(location).rstrip("/"))


def suffix(location: str | Path) -> str:
    """The file extension, lower-case with its dot (``.csv``), or ``""``."""
    return posixpath.splitext(_plain_path(location))[1].lower()


def stamp(location: str | Path) -> str:
    """``size:mtime`` of a file (``""`` when it is not there): enough to notice that it changed."""
    if not is_uri(location):
        path = Path(location).expanduser()
        return f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else ""
    try:
        filesystem, key = _resolve(str(location))
        with _store_errors(str(location)):
            info = filesystem.get_file_info(key)
    except OSError:
        return ""
    return f"{info.size}:{info.mtime_ns}" if info.type.name == "File" else ""


def cache_root() -> Path:
    """Where carsearch keeps derived files: ``$CARSEARCH_CACHE`` or ``~/.cache/carsearch``."""
    return Path(os.environ.get("CARSEARCH_CACHE") or Path.home() / ".cache" / "carsearch")


def local_copy(location: str | Path) -> Path:
    """A local file with ``location``'s bytes, for libraries that need a path (ultralytics): a local path as
    it is; a URI downloaded into ``cache_root()/downloads`` under its content hash (kept: the next call
    reads the object again but writes nothing when it has not changed). Raises ``OSError`` like
    :func:`read_bytes`."""
    if not is_uri(location):
        return Path(location).expanduser()
    import hashlib

    from carsearch.data.atomic import atomic_write_bytes

    data = read_bytes(location)
    digest = hashlib.blake2b(data, digest_size=8).hexdigest()
    target = cache_root() / "downloads" / f"{digest}-{name(location) or 'file'}"
    if not target.is_file() or target.stat().st_size != len(data):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    return target


def identity(location: str | Path) -> str:
    """A stable name for cache keys: the resolved local path, or the URI."""
    return str(location) if is_uri(location) else str(Path(location).resolve())
