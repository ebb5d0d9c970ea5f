"""Per-item metadata stored beside the vectors: :class:`ItemRecord`, held as Arrow columns by :class:`RecordTable`."""

from __future__ import annotations

import operator
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class ItemRecord:
    """One indexed crop. ``key`` identifies its source image; ``content_hash`` its bytes."""

    path: str
    label: str | None
    content_hash: str
    box: list[float] | None = None  # the embedded region (x1, y1, x2, y2) in original-image pixels
    det_score: float | None = None
    det_class: str | None = None
    flags: list[str] = field(default_factory=list)
    image_size: list[int] | None = None  # (width, height) of the original image
    crop_index: int = 0  # > 0 for the extra cars of an image under the "all" selection policy

    @property
    def key(self) -> str:
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("content_hash", pa.string()),
        ("box", pa.list_(pa.float64())),
        ("det_score", pa.float64()),
        ("det_class", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("image_size", pa.list_(pa.int64())),
        ("crop_index", pa.int64()),
    ]
)


class RecordTable(Sequence[ItemRecord]):
    """The records of an index as Arrow columns, row i beside vector i.

    A sequence of :class:`ItemRecord` (built row by row on access) that costs the records' bytes in RAM
    instead of Python objects per item, and nothing until read when opened from a file (memory-mapped
    Arrow IPC; sizes in docs/indexes.md#records). Whole-column questions (labelled rows, rows with a
    content hash) are answered by Arrow compute without making records.
    """

    def __init__(self, table: pa.Table | None = None) -> None:
        if table is not None and not table.schema.equals(SCHEMA):
            raise ValueError(f"record table schema {table.schema} is not the item schema {SCHEMA}")
        self.table = table if table is not None else SCHEMA.empty_table()

    @classmethod
    def of(cls, records: Iterable[ItemRecord]) -> RecordTable:
        """``records`` as a table (a :class:`RecordTable` is returned as it is)."""
        if isinstance(records, RecordTable):
            return records
        return cls(pa.Table.from_pylist([r.to_dict() for r in records], schema=SCHEMA))

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, key: int) -> ItemRecord: ...

    @overload
    def __getitem__(self, key: slice) -> RecordTable: ...

    def __getitem__(self, key: int | slice) -> ItemRecord | RecordTable:
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        row = operator.index(key)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"record {key} out of range for {len(self)} records")
        return ItemRecord.from_dict(self.table.slice(row, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[ItemRecord]:
        for batch in self.table.to_batches(max_chunksize=4096):
            yield from (ItemRecord.from_dict(row) for row in batch.to_pylist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (RecordTable, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    # unhashable, like a list; typeshed needs the same ignore for list: object.__hash__ is not Optional
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records)"

    def take(self, ids: Sequence[int] | np.ndarray) -> RecordTable:
        """The rows ``ids``, in that order."""
        return RecordTable(self.table.take(pa.array(np.asarray(ids, dtype=np.int64), pa.int64())))

    def concat(self, other: Iterable[ItemRecord]) -> RecordTable:
        """These rows, then ``other``'s."""
        return RecordTable.concatenate([self, RecordTable.of(other)])

    @staticmethod
    def concatenate(tables: Sequence[RecordTable]) -> RecordTable:
        """The rows of ``tables``, end to end (no copy: Arrow keeps the pieces as chunks)."""
        return RecordTable(pa.concat_tables([t.table for t in tables])) if tables else RecordTable()

    def column(self, name: str) -> list[Any]:
        """One field of every row, as Python values (``label``: ``None`` for unlabelled items)."""
        return self.table.column(name).to_pylist()

    def labelled_ids(self) -> np.ndarray:
        """Rows whose label is set, ascending."""
        return np.flatnonzero(pc.is_valid(self.table.column("label")).to_numpy(zero_copy_only=False))

    def ids_with_hash(self, content_hash: str) -> np.ndarray:
        """Rows whose image bytes hash to ``content_hash`` (a duplicate file can be indexed under several paths)."""
        same = pc.fill_null(pc.equal(self.table.column("content_hash"), content_hash), False)
        return np.flatnonzero(same.to_numpy(zero_copy_only=False))

    def count_flag(self, flag: str) -> int:
        """How many rows carry ``flag`` (a row lists a flag at most once)."""
        return int(pc.sum(pc.equal(pc.list_flatten(self.table.column("flags")), flag)).as_py() or 0)

    def write(self, handle: BinaryIO) -> None:
        """Write as an Arrow IPC file (memory-mappable by :meth:`read`) to a binary ``handle``."""
        sink = pa.PythonFile(handle, mode="w")
        with pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(self.table, max_chunksize=65536)

    @classmethod
    def read(cls, path: str | Path) -> RecordTable:
        """Open an Arrow IPC file written by :meth:`write`, memory-mapped (RAM holds what is read)."""
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path} is not a readable record file: {exc}") from None
        return cls(table)

    def relative_paths(self) -> np.ndarray:
        """Rows whose ``path`` is a relative local path (neither absolute nor a URI)."""
        paths = self.table.column("path")
        relative = pc.and_(pc.invert(pc.starts_with(paths, "/")), pc.invert(pc.match_substring(paths, "://")))
        return np.flatnonzero(pc.fill_null(relative, False).to_numpy(zero_copy_only=False))

    def with_paths_under(self, folder: str) -> RecordTable:
        """These rows with relative local paths made absolute by prefixing ``folder`` (an absolute folder)."""
        if not len(self.relative_paths()):
            return self
        paths = self.table.column("path")
        relative = pc.and_(pc.invert(pc.starts_with(paths, "/")), pc.invert(pc.match_substring(paths, "://")))
        joined = pc.binary_join_element_wise(pa.scalar(folder.rstrip("/")), paths, "/")
        values = pc.if_else(relative, joined, paths).to_pylist()
        for row in self.relative_paths():  # "a/../b" spelled as os.path.abspath spells it (the job's keys)
            values[row] = posixpath.normpath(values[row])
        return self._with_path_column(pa.chunked_array([pa.array(values, pa.string())]))

    def with_paths_relative_to(self, folder: str) -> RecordTable:
        """These rows with the paths inside the absolute ``folder`` written relative to it (others unchanged)."""
        prefix = folder.rstrip("/") + "/"
        paths = self.table.column("path")
        inside = pc.fill_null(pc.starts_with(paths, prefix), False)
        if not pc.any(inside).as_py():
            return self
        stripped = pc.utf8_slice_codeunits(paths, len(prefix))
        return self._with_path_column(pc.if_else(inside, stripped, paths))

    def _with_path_column(self, column: pa.ChunkedArray) -> RecordTable:
        index = self.table.schema.get_field_index("path")
        return RecordTable(self.table.set_column(index, SCHEMA.field("path"), column))
