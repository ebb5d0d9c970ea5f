"""Crash-safe progress of a batch job: each finished batch is one atomically written chunk file."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carsearch.data.atomic import atomic_write_bytes
from carsearch.index.records import ItemRecord


@dataclass
class Chunk:
    """Results of some processed images: embedded items (records + vectors) and recorded errors."""

    records: list[ItemRecord] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0

    def __bool__(self) -> bool:
        return bool(self.images)


class ChunkStore:
    """``work/chunk-NNNNNN.npz`` files in an index directory; a killed job leaves only whole chunks."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".chunk-*.tmp"):
            stale.unlink(missing_ok=True)  # half-written by a killed run
        existing = sorted(self.folder.glob("chunk-*.npz"))
        self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0

    def write(self, chunk: Chunk, dim: int) -> None:
        vectors = np.stack(chunk.vectors).astype(np.float32) if chunk.vectors else np.zeros((0, dim), np.float32)
        meta = {"records": [r.to_dict() for r in chunk.records], "errors": chunk.errors, "images": chunk.images}
        buffer = io.BytesIO()
        np.savez(buffer, vectors=vectors, meta=np.array(json.dumps(meta)))
        atomic_write_bytes(self.folder / f"chunk-{self._next:06d}.npz", buffer.getvalue())
        self._next += 1

    def read_all(self) -> list[Chunk]:
        chunks = []
        for path in sorted(self.folder.glob("chunk-*.npz")):
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                vectors = data["vectors"]
            records = [ItemRecord.from_dict(r) for r in meta["records"]]
            chunks.append(Chunk(records, list(vectors), meta["errors"], int(meta["images"])))
        return chunks

    def clear(self) -> None:
        for path in self.folder.glob("chunk-*.npz"):
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass
