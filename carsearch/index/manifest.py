"""An index's manifest (``manifest.json``) as one typed record: how its vectors were made, what its files hold.

Rules:
- :meth:`Manifest.read` is the file's one reader and :meth:`Manifest.write` its one writer (atomic, keys sorted,
  as every version wrote it). A missing, unreadable, foreign, newer or damaged file is refused with
  :class:`~carsearch.errors.IndexMismatchError` in one line.
- Older versions are read as written and upgraded by meaning: the accessors answer for them (a version-1
  manifest's ``index_kind`` without ``index``, paths stored as typed without ``paths``, no ``files`` checksums,
  an older config's keys). Keys this version does not know are kept and written back unchanged, and a field
  absent from the file is None here and stays absent when written, so a manifest round-trips byte for byte.
- Nothing outside this module reads the manifest by key: the sections that other code compares whole
  (``embedder``, ``processing``, ``config``) are plain dicts, the values read one by one are accessors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from carsearch.config import upgrade_config
from carsearch.data.atomic import atomic_write_json
from carsearch.errors import IndexMismatchError

FORMAT = "carsearch-index"
VERSION = 2  # 2: records as Arrow columns (items.arrow); 1: JSON lines (items.jsonl), still read
MANIFEST = "manifest.json"
REBUILD = "rebuild it: delete the folder and run `carsearch index SOURCE --out FOLDER` again"
_DICTS = ("embedder", "processing", "config", "versions", "detector_weights", "index", "files", "paths")
_INTS = ("dim", "count")
_STRINGS = ("format", "created", "index_kind")


@dataclass(frozen=True)
class FileDigest:
    """Size and SHA-256 of one of an index's files, as its manifest's ``files`` records them."""

    bytes: int
    sha256: str


@dataclass
class Manifest:
    """An index's ``manifest.json``; None: absent from the file (or not yet saved).

    Until saved, it holds how a pipeline makes vectors (``embedder`` identity, ``processing``, ``config``,
    ``versions``, ``created``, ``detector_weights``); :meth:`committed` adds what a save knows (format, version,
    counts, index kind and tuning, file digests, how paths are stored).
    """

    embedder: dict[str, Any] | None = None  # the embedder's identity: dim, spec, fingerprint, tta, source, ...
    processing: dict[str, Any] | None = None  # crop, crop_source, detector settings, max_image_side
    config: dict[str, Any] | None = None  # the pipeline config as built, local paths absolute
    versions: dict[str, Any] | None = None
    created: str | None = None
    detector_weights: dict[str, Any] | None = None  # name, sha256, bytes, source, file (a WeightsRecord)
    format: str | None = None
    version: int | None = None
    dim: int | None = None
    count: int | None = None
    index_kind: str | None = None
    index: dict[str, Any] | None = None  # kind, nprobe / ef_search, measured recall, bytes_per_vector
    files: dict[str, Any] | None = None  # file name -> {"bytes", "sha256"}
    paths: dict[str, Any] | None = None  # {"relative_to": "index", "relative": how many}
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys (and known ones stored null), as read

    # Reading and writing

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of the index in ``folder``, validated; refused in one line when missing or unusable."""
        path = Path(folder) / MANIFEST
        if not path.exists():
            raise IndexMismatchError(
                f"{folder} is not a carsearch index (no {MANIFEST}); build one with `carsearch index`"
            )
        try:
            text = path.read_text()
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            raise IndexMismatchError(f"{folder}/{MANIFEST} cannot be read ({type(exc).__name__}); {REBUILD}") from None
        return cls.from_json(text, folder)

    @classmethod
    def from_json(cls, text: str, folder: str | Path = ".") -> Manifest:
        """The manifest in ``text`` (the file of the index in ``folder``, named in errors), validated: a
        carsearch index manifest of this version or an older one, every known field of its type."""
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError
            raise IndexMismatchError(f"{folder}/{MANIFEST} cannot be read ({type(exc).__name__}); {REBUILD}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IndexMismatchError(f"{folder}/{MANIFEST} is not a carsearch index manifest")
        version = data.get("version", -1)
        if _version(version, f"{folder}/{MANIFEST}") > VERSION:  # before any other check: a newer file may differ
            raise IndexMismatchError(f"{folder} has index version {version}; this carsearch reads <= {VERSION}")
        return cls.from_dict(data, f"{folder}/{MANIFEST}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        """A manifest from its JSON object (or a pipeline's unsaved one), every known field checked for its
        type (:class:`IndexMismatchError` naming ``where`` and the field); a null field counts as absent."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known and value is not None}
        if "version" in values:
            values["version"] = _version(values["version"], where)
        for key, value in values.items():
            expected = dict if key in _DICTS else int if key in _INTS or key == "version" else str
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise IndexMismatchError(
                    f"{where} is damaged ({key} is {type(value).__name__}, not {expected.__name__}); {REBUILD}"
                )
        for name, digest in (values.get("files") or {}).items():
            if not (isinstance(digest, dict) and isinstance(digest.get("bytes"), int) and "sha256" in digest):
                raise IndexMismatchError(f"{where} is damaged (files.{name} has no size and checksum); {REBUILD}")
        # Unknown keys, and known ones stored as null (written back so), are kept as read.
        extra = {key: value for key, value in data.items() if key not in values}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the known fields that are set, and the unknown keys as read."""
        data = dict(self.extra)
        data.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return {key: value for key, value in data.items() if value is not None or key in self.extra}

    def to_json(self) -> str:
        """The file's text: two-space indented, keys sorted, a final newline (what every version wrote)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def write(self, path: str | Path) -> None:
        """Write the manifest to the file ``path`` atomically (a save writes a staged name, then renames it)."""
        atomic_write_json(path, self.to_dict())

    def copy(self) -> Manifest:
        """A copy whose fields can be replaced without changing this one (sections are shared, as before)."""
        return replace(self, extra=dict(self.extra))

    def committed(
        self, dim: int, count: int, index: dict[str, Any], files: dict[str, Any], relative_paths: int
    ) -> Manifest:
        """This manifest as a save writes it: this version, the counts, the index's kind and tuning, the files'
        digests, and paths inside the index folder stored relative to it (``relative_paths`` of them)."""
        return replace(
            self.copy(),
            format=FORMAT,
            version=VERSION,
            dim=dim,
            count=count,
            index_kind=index["kind"],
            index=index,
            files=files,
            paths={"relative_to": "index", "relative": relative_paths},
        )

    # The embedder

    @property
    def embedder_identity(self) -> dict[str, Any]:
        """The identity of the embedder that made the vectors; empty when the manifest records none."""
        return self.embedder or {}

    @property
    def train_labels(self) -> list[str] | None:
        """The class names the embedder was trained on; None when it does not record them."""
        labels = self.embedder_identity.get("train_labels")
        return None if labels is None else list(labels)

    @property
    def model_name(self) -> str | None:
        """The embedder's source as the index was built with it (a zoo name, a checkpoint path); None: unknown."""
        source = self.embedder_identity.get("source")
        return str(source) if source else None

    # The detector

    @property
    def crop_detector(self) -> dict[str, Any] | None:
        """The detector settings that made the crops (``processing.detector``); None for a raw index."""
        detector = (self.processing or {}).get("detector")
        return detector if isinstance(detector, dict) else None

    @property
    def detector_name(self) -> str | None:
        """The detector weights as the processing names them (a file name); None for a raw index."""
        return (self.crop_detector or {}).get("weights")

    @detector_name.setter
    def detector_name(self, name: str | None) -> None:
        if self.crop_detector is None:
            raise ValueError("a raw index's processing names no detector weights")
        self.crop_detector["weights"] = name

    @property
    def configured_detector_weights(self) -> str | None:
        """The detector weights of the config as stored (a path, URI or name); None when it names none."""
        weights = ((self.config or {}).get("detector") or {}).get("weights")
        return None if weights is None else str(weights)

    def record_detector_weights(self, record: dict[str, Any]) -> None:
        """Record the weights file that made the crops (a ``WeightsRecord`` dict): ``detector_weights``, and
        its source as the config's detector weights."""
        self.detector_weights = record
        self.config = self.config if self.config is not None else {}
        self.config.setdefault("detector", {})["weights"] = record["source"]

    # The config

    @property
    def built_config(self) -> dict[str, Any] | None:
        """The config the index was built with, in today's keys and meaning (an older one upgraded); None when
        the manifest records none."""
        return None if self.config is None else upgrade_config(self.config)

    # The files

    @property
    def has_checksums(self) -> bool:
        """Whether the manifest lists its files' digests (indexes written before checksums do not)."""
        return self.files is not None

    def digest(self, name: str) -> FileDigest | None:
        """The recorded size and SHA-256 of the file ``name``; None when not recorded."""
        digest = (self.files or {}).get(name)
        return None if digest is None else FileDigest(int(digest["bytes"]), str(digest["sha256"]))

    @property
    def index_info(self) -> dict[str, Any]:
        """The faiss index's kind and tuned search parameter (a version-1 manifest: its ``index_kind`` only)."""
        return self.index or {"kind": self.index_kind}

    @property
    def paths_relative_to_index(self) -> bool:
        """Whether local paths inside the index folder are stored relative to it; otherwise (older indexes)
        paths are as typed, relative to the folder the index was built from."""
        return isinstance(self.paths, dict) and self.paths.get("relative_to") == "index"

    @property
    def relative_paths(self) -> int:
        """How many stored paths are relative to the index folder (0 unless :attr:`paths_relative_to_index`)."""
        return int((self.paths or {}).get("relative") or 0) if self.paths_relative_to_index else 0


def _version(value: Any, where: str) -> int:
    """A manifest's version as a number (an older file may hold it as text); damaged when it is none."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(value)
        return int(value)
    except ValueError:
        raise IndexMismatchError(f"{where} is damaged (version {value!r}); {REBUILD}") from None


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of the index in ``folder`` (:meth:`Manifest.read`)."""
    return Manifest.read(folder)


def check_identity(stored: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise :class:`IndexMismatchError` naming the first field where two embedder identities differ."""
    for key in ("dim", "spec", "fingerprint", "tta"):  # tta: "flip", or absent (no test-time augmentation)
        if stored.get(key) != actual.get(key):
            raise IndexMismatchError(
                f"{where} was built with another embedder ({key} differs): the index's is {_embedder(stored)}, "
                f"this one is {_embedder(actual)}; use the index's model (--model), or rebuild the index"
            )


def _embedder(identity: dict[str, Any]) -> str:
    """A short description of an embedder identity: source, backbone, input size, dimension, flip."""
    spec = identity.get("spec") or {}
    size = (spec.get("preprocessing") or {}).get("image_size")
    parts = [str(spec.get("backbone", "?")), f"{size} px" if size else "", f"{identity.get('dim')}-d"]
    parts += ["flip TTA"] if identity.get("tta") else []
    return f"{identity.get('source')!r} ({', '.join(p for p in parts if p)})"
