"""Dataset sources → a flat list of :class:`SourceItem` (path, label, optional ground-truth box).

Supported: a folder tree (label = first sub-folder), a CSV (``path,label[,x1,y1,x2,y2]``), the Stanford
Cars devkit (``.mat`` annotations) and the Kaggle class-folder layout (``anno_train.csv``/``anno_test.csv``).
Folder trees and CSVs may also sit in an object store (``s3://bucket/cars/``, ``gs://...``: see
:mod:`carsearch.data.storage`); their items then carry URIs.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from carsearch.data import storage
from carsearch.errors import DataSourceError
from carsearch.types import BBox

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jfif"})
Split = Literal["train", "test", "all"]


@dataclass(frozen=True)
class SourceItem:
    """One input image; ``box`` is a ground-truth vehicle box in its pixels (x2/y2 exclusive). ``path`` is a
    local ``Path`` or a URI string (``s3://...``; read with :func:`carsearch.data.storage.read_bytes`).
    ``skip_reason``: a file a folder source holds that is not an image (recorded as an error, never read)."""

    path: storage.Location
    label: str | None = None
    box: BBox | None = None
    skip_reason: str | None = None


def read_source(
    source: str | Path, split: Split = "all", where: dict[str, str] | None = None, non_images: bool = False
) -> list[SourceItem]:
    """Items of a folder tree, CSV, Stanford devkit or Kaggle layout (detected from what is there).

    ``where`` (CSV only): keep rows whose columns equal these values, e.g. ``{"box_fully_visible": "1"}``.
    ``split`` other than ``all`` applies to the devkit and Kaggle layouts only. ``non_images``: a folder's
    non-hidden files that are not images come as items with a ``skip_reason`` (the index records them).
    """
    if storage.is_uri(source):
        _no_split(split, source)
        return _read_uri(str(source), where, non_images)
    source = Path(source).expanduser()
    if not source.exists():
        raise DataSourceError(f"source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataSourceError(f"source file {source} must be a .csv (path,label[,x1,y1,x2,y2]) or a folder")
        _no_split(split, source)
        return read_csv(source, where)
    if where:
        raise DataSourceError(f"row filters ({', '.join(where)}) apply to CSV sources only, not to {source}")
    if (source / "devkit").is_dir() or (source / "cars_annos.mat").exists():
        return read_stanford_devkit(source, split)
    if any(source.glob("anno_*.csv")) or any(source.glob("*/anno_*.csv")):
        return read_kaggle(source, split)
    _no_split(split, source)
    return read_folder(source, non_images)


def _no_split(split: Split, source: str | Path) -> None:
    """A folder or CSV has no train/test split: asking for one is refused, not ignored."""
    if split != "all":
        raise DataSourceError(f"split {split!r} applies to a Stanford devkit or Kaggle root, not to {source}")


def _read_uri(source: str, where: dict[str, str] | None, non_images: bool = False) -> list[SourceItem]:
    """A CSV or a folder tree behind a URI (the Stanford and Kaggle layouts need a local folder)."""
    try:
        if storage.suffix(source) == ".csv":
            return read_csv(source, where)
        if where:
            raise DataSourceError(f"row filters ({', '.join(where)}) apply to CSV sources only, not to {source}")
        return read_folder(source, non_images)
    except DataSourceError:
        raise
    except FileNotFoundError:
        raise DataSourceError(f"source {source} does not exist") from None
    except OSError as exc:  # unreachable store, refused credentials
        raise DataSourceError(f"cannot read source {source}: {exc}") from None
    except ValueError as exc:  # pyarrow's ArrowInvalid: an unknown scheme or URI option
        raise DataSourceError(f"cannot read source {source}: {exc}") from None


def read_folder(root: str | Path, non_images: bool = False) -> list[SourceItem]:
    """Every image file below ``root`` (a folder or a URI prefix), sorted; label = its first sub-folder (None
    at the top level). Hidden files and folders are ignored; other files that are not images (by extension)
    are left out, or with ``non_images`` listed with a ``skip_reason``."""
    if storage.is_uri(root):
        found: list[tuple[tuple[str, ...], storage.Location]] = [
            (tuple(relative.split("/")), uri) for relative, uri in storage.list_files(str(root))
        ]
    else:
        root = Path(root)
        found = [(p.relative_to(root).parts, p) for p in sorted(p for p in root.rglob("*") if p.is_file())]
    items = []
    for parts, path in found:
        if any(part.startswith(".") for part in parts):
            continue  # hidden files and folders (.thumbnails, .ipynb_checkpoints) are not data
        label = parts[0] if len(parts) > 1 else None
        suffix = storage.suffix(parts[-1])
        if suffix in IMAGE_EXTENSIONS:
            items.append(SourceItem(path=path, label=label))
        elif non_images:
            items.append(SourceItem(path, label, skip_reason=f"not an image file ({suffix or 'no extension'})"))
    if all(item.skip_reason for item in items):
        raise DataSourceError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    return items


def _parse_box(row: dict[str, str], where: str) -> BBox | None:
    values = [row.get(c, "") for c in ("x1", "y1", "x2", "y2")]
    if all(v in ("", None) for v in values):
        return None
    try:
        return BBox(*(float(v) for v in values))
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"{where}: bad box {values}: {exc}") from None


def read_csv(path: str | Path, where: dict[str, str] | None = None) -> list[SourceItem]:
    """A CSV with header ``path,label[,x1,y1,x2,y2]`` (extra columns ignored); paths relative to the CSV
    (local or a URI; a row may also name an absolute path or a URI).

    ``where``: keep only rows whose named columns hold exactly these values.
    """
    path = storage.as_location(path)
    folder = storage.parent(path)
    text = storage.read_bytes(path).decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" BOM
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if "path" not in columns:
            raise DataSourceError(f"{path}: needs a header with a 'path' column (got {sorted(columns)})")
        missing = sorted(set(where or {}) - columns)
        if missing:
            raise DataSourceError(f"{path}: no column {', '.join(missing)} to filter on (columns: {sorted(columns)})")
        items = []
        for line, row in enumerate(reader, start=2):
            if where and any(row.get(column) != value for column, value in where.items()):
                continue
            if not row.get("path"):
                raise DataSourceError(f"{path}:{line}: empty path")
            label = row.get("label") or None
            item_path = storage.join(folder, row["path"])
            items.append(SourceItem(path=item_path, label=label, box=_parse_box(row, f"{path}:{line}")))
    if not items:
        raise DataSourceError(f"{path} lists no images" + (f" where {where}" if where else ""))
    return items


def _devkit_box(x1: float, y1: float, x2: float, y2: float) -> BBox:
    # Devkit boxes are 1-based and inclusive; ours are 0-based with exclusive ends.
    return BBox(float(x1) - 1.0, float(y1) - 1.0, float(x2), float(y2))


def _mat_str(value: object) -> str:
    import numpy as np

    while isinstance(value, np.ndarray):
        value = value.flat[0] if value.size else ""
    return str(value)


def _mat_num(value: object) -> float:
    import numpy as np

    return float(np.asarray(value).reshape(-1)[0])


def read_stanford_devkit(root: str | Path, split: Split = "all") -> list[SourceItem]:
    """Stanford Cars: ``cars_annos.mat`` (all images) or ``devkit/cars_{train,test}_annos.mat`` + image folders."""
    from scipy.io import loadmat

    root = Path(root)
    combined = root / "cars_annos.mat"
    if combined.exists():
        mat = loadmat(combined)
        names = [_mat_str(n) for n in mat["class_names"].reshape(-1)]
        items = []
        for a in mat["annotations"].reshape(-1):
            is_test = bool(_mat_num(a["test"]))
            if split != "all" and is_test != (split == "test"):
                continue
            label = names[int(_mat_num(a["class"])) - 1]
            box = _devkit_box(*(_mat_num(a[f"bbox_{c}"]) for c in ("x1", "y1", "x2", "y2")))
            items.append(SourceItem(root / _mat_str(a["relative_im_path"]), label, box))
        return items
    devkit = root / "devkit"
    meta = devkit / "cars_meta.mat"
    if not meta.exists():
        raise DataSourceError(f"{root}: devkit layout needs devkit/cars_meta.mat")
    names = [_mat_str(n) for n in loadmat(meta)["class_names"].reshape(-1)]
    items = []
    for part in ("train", "test") if split == "all" else (split,):
        # The devkit's cars_test_annos.mat has no labels: prefer the *_withlabels file wherever it is.
        candidates = [
            root / f"cars_{part}_annos_withlabels.mat",
            devkit / f"cars_{part}_annos_withlabels.mat",
            devkit / f"cars_{part}_annos.mat",
        ]
        annos = next((c for c in candidates if c.exists()), None)
        if annos is None:
            raise DataSourceError(f"{root}: missing devkit/cars_{part}_annos.mat")
        for a in loadmat(annos)["annotations"].reshape(-1):
            if "class" not in (a.dtype.names or ()):
                raise DataSourceError(f"{annos} has no class labels (use cars_test_annos_withlabels.mat)")
            label = names[int(_mat_num(a["class"])) - 1]
            box = _devkit_box(*(_mat_num(a[f"bbox_{c}"]) for c in ("x1", "y1", "x2", "y2")))
            items.append(SourceItem(root / f"cars_{part}" / _mat_str(a["fname"]), label, box))
    return items


def read_kaggle(root: str | Path, split: Split = "all") -> list[SourceItem]:
    """Kaggle "stanford-car-dataset-by-classes-folder": ``{train,test}/<class>/<file>`` + ``anno_{split}.csv``."""
    root = Path(root)
    items = []
    for part in ("train", "test") if split == "all" else (split,):
        anno = next(iter(sorted(root.glob(f"anno_{part}.csv")) + sorted(root.glob(f"*/anno_{part}.csv"))), None)
        folder = next(
            (p for p in (root / part, *root.glob(f"*/{part}"), *root.glob(f"*/*/{part}")) if p.is_dir()), None
        )
        if anno is None or folder is None:
            raise DataSourceError(f"{root}: Kaggle layout needs anno_{part}.csv and a {part}/ class-folder tree")
        boxes: dict[str, BBox] = {}
        with anno.open(newline="") as handle:
            for row in csv.reader(handle):
                if len(row) >= 5 and row[0]:
                    try:
                        boxes[row[0]] = _devkit_box(*(float(v) for v in row[1:5]))
                    except ValueError:
                        continue  # header or malformed line
        for item in read_folder(folder):
            items.append(SourceItem(item.path, item.label, boxes.get(Path(item.path).name)))
    return items
