"""Crash-safe progress of a batch job: each finished batch is one atomically written chunk file."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from carsearch.data.atomic import atomic_write_bytes
from carsearch.index.records import ItemRecord, RecordTable


@dataclass
class Chunk:
    """Results of some processed images: embedded items (records + vectors) and recorded errors."""

    records: list[ItemRecord] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0

    def __bool__(self) -> bool:
        return bool(self.images)


@dataclass(frozen=True)
class ChunkMeta:
    """What a written chunk holds besides its vectors (read first: the merge reads vectors part by part)."""

    path: Path
    records: RecordTable
    errors: list[dict[str, Any]]
    images: int


class ChunkStore:
    """``work/chunk-NNNNNN.{npz,parquet}`` files in an index directory; a killed job leaves only whole chunks.

    The local engine writes ``.npz``; the Ray engine Parquet (``fmt="parquet"``: one row per item, the
    record as JSON and the vector, errors and image count in the schema metadata). Either
    engine resumes from both.
    """

    FORMATS = ("npz", "parquet")

    def __init__(self, folder: str | Path, fmt: str = "npz") -> None:
        if fmt not in self.FORMATS:
            raise ValueError(f"chunk format must be one of {self.FORMATS}, got {fmt!r}")
        self.folder = Path(folder)
        self.fmt = fmt
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".chunk-*.tmp"):
            stale.unlink(missing_ok=True)  # half-written by a killed run
        existing = self._files()
        self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0

    def _files(self) -> list[Path]:
        files = [p for fmt in self.FORMATS for p in self.folder.glob(f"chunk-*.{fmt}")]
        return sorted(files, key=lambda p: p.stem)

    def write(self, chunk: Chunk, dim: int) -> None:
        """Write ``chunk`` atomically as the next numbered file (an empty chunk's vectors: (0, ``dim``))."""
        vectors = np.stack(chunk.vectors).astype(np.float32) if chunk.vectors else np.zeros((0, dim), np.float32)
        path = self.folder / f"chunk-{self._next:06d}.{self.fmt}"
        if self.fmt == "parquet":
            atomic_write_bytes(path, _parquet_bytes(chunk, vectors))
        else:
            meta = {"records": [r.to_dict() for r in chunk.records], "errors": chunk.errors, "images": chunk.images}
            buffer = io.BytesIO()
            np.savez(buffer, vectors=vectors, meta=np.array(json.dumps(meta)))
            atomic_write_bytes(path, buffer.getvalue())
        self._next += 1

    def paths(self) -> list[Path]:
        """The chunk files, in the order they were written."""
        return self._files()

    def read_meta(self, path: Path) -> ChunkMeta:
        """A chunk's records (as columns), errors and image count, without reading its vectors."""
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=["record"])
            meta = json.loads(table.schema.metadata[b"carsearch"])
            rows = [json.loads(r) for r in table.column("record").to_pylist()]
        else:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
            rows = meta["records"]
        records = RecordTable.of(ItemRecord.from_dict(r) for r in rows)
        return ChunkMeta(path, records, meta["errors"], int(meta["images"]))

    def read_vectors(self, path: Path) -> np.ndarray:
        """A chunk's vectors (N, D) float32, row i beside record i."""
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=["vector"])
            dim = int(json.loads(table.schema.metadata[b"carsearch"])["dim"])
            values = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
            return values.reshape(len(table), dim).astype(np.float32)
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["vectors"], dtype=np.float32)

    def clear(self) -> None:
        """Delete every chunk file, then the folder when nothing else is left in it."""
        for path in self._files():
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def _parquet_bytes(chunk: Chunk, vectors: np.ndarray) -> bytes:
    dim = vectors.shape[1]
    table = pa.table(
        {
            "record": pa.array([json.dumps(r.to_dict()) for r in chunk.records], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        }
    )
    meta = {"errors": chunk.errors, "images": chunk.images, "dim": dim}
    table = table.replace_schema_metadata({"carsearch": json.dumps(meta)})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()
