"""Training data: class-disjoint splits, crops (raw / ground-truth box / detector box) and their transforms."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from carsearch.config import DetectorConfig, PipelineConfig
from carsearch.data.cropping import apply_plan, plan_image
from carsearch.data.images import load_image
from carsearch.data.sources import SourceItem
from carsearch.embedder.preprocessing import (
    Preprocessing,
    Size,
    interpolation_mode,
    normalise_transforms,
    resize_transforms,
)
from carsearch.embedder.training.config import InputMode, ValCarve
from carsearch.errors import ConfigError, DataSourceError
from carsearch.types import Detection

logger = logging.getLogger(__name__)


def sort_classes(classes: Sequence[str]) -> list[str]:
    """Unique class names, sorted numerically when every name is an integer ("2" before "10"), else by text."""
    unique = set(classes)
    if unique and all(name.strip().lstrip("-").isdigit() for name in unique):
        return sorted(unique, key=lambda name: int(name))
    return sorted(unique)


@dataclass(frozen=True)
class ClassSplits:
    """Disjoint class lists: ``train`` learns, ``val`` picks the epoch, ``test`` reports (may be empty)."""

    train: list[str]
    val: list[str]
    test: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def carve_out(classes: Sequence[str], fraction: float, how: ValCarve = "last") -> tuple[list[str], list[str]]:
    """(kept, carved): ``round(fraction × n)`` classes of the sorted list are carved out.

    ``last``: the last ones, a contiguous block, as the half split cuts test classes (with CARS196's names,
    mostly other makes). ``spaced``: evenly spaced over the list; their neighbours (often the same model in
    another year) then train, which makes validation easier than the test split.
    """
    ordered = sort_classes(classes)
    count = round(fraction * len(ordered))
    if count == 0:
        return ordered, []
    if how == "last":
        return ordered[:-count], ordered[-count:]
    if how != "spaced":
        raise ConfigError(f"unknown validation carve-out {how!r}; valid: last, spaced")
    picked = {ordered[int((i + 0.5) * len(ordered) / count)] for i in range(count)}
    return [c for c in ordered if c not in picked], [c for c in ordered if c in picked]


def split_classes(
    labels: Sequence[str],
    mode: Literal["half", "all", "list"] = "half",
    train_classes: Sequence[str] = (),
    val_classes: Sequence[str] = (),
    test_classes: Sequence[str] = (),
    val_fraction: float = 0.0,
    val_carve: ValCarve = "last",
) -> ClassSplits:
    """Disjoint train / validation / test class lists of ``labels``.

    ``half``: the first half of the sorted classes train, the second half test (for 196 CARS classes:
    1–98 / 99–196; an odd count gives training the extra class). ``all``: every class trains, no test.
    ``list``: ``train_classes``, ``val_classes`` and ``test_classes`` (default: every class not named).
    Without ``val_classes``, ``val_fraction`` of the training classes are carved out to validate
    (``val_carve``: see :func:`carve_out`).
    """
    classes = sort_classes(labels)
    val = [str(c) for c in val_classes]
    if mode == "half":
        if len(classes) < 4:
            raise ConfigError(f"class_split=half needs at least 4 classes (2 + 2), the data has {len(classes)}")
        cut = (len(classes) + 1) // 2
        train, test = classes[:cut], classes[cut:]
    elif mode == "all":
        train, test = classes, []
    elif mode == "list":
        train, test = _listed_classes(classes, train_classes, val, test_classes)
    else:
        raise ConfigError(f"unknown class split {mode!r}; valid: half, all, list")
    if not val and val_fraction > 0:
        train, val = carve_out(train, val_fraction, val_carve)
    _check_split_sizes(train, val, test)
    return ClassSplits(sort_classes(train), sort_classes(val), sort_classes(test))


def _listed_classes(
    classes: list[str], train_classes: Sequence[str], val: list[str], test_classes: Sequence[str]
) -> tuple[list[str], list[str]]:
    """``class_split=list``: (train, test) as named (test: every class not named), all in the data and disjoint."""
    train = [str(c) for c in train_classes]
    named = {*train, *val}
    test = [str(c) for c in test_classes] or [c for c in classes if c not in named]
    missing = sorted({*train, *val, *test} - set(classes))
    if missing:
        raise ConfigError(f"class(es) not in the data: {missing[:10]}{' …' if len(missing) > 10 else ''}")
    for a, b, names in (
        (train, val, "train and validation"),
        (train, test, "train and test"),
        (val, test, "validation and test"),
    ):
        overlap = sorted(set(a) & set(b))
        if overlap:
            raise ConfigError(f"{names} classes must be disjoint; both have {overlap[:10]}")
    return train, test


def _check_split_sizes(train: list[str], val: list[str], test: list[str]) -> None:
    """At least 2 training classes, and 2 validation / test classes where there are any."""
    if len(set(train)) < 2:
        raise ConfigError(f"need >= 2 training classes, got {len(set(train))}")
    if val and len(set(val)) < 2:
        raise ConfigError(f"need >= 2 validation classes (or none), got {len(set(val))}; raise data.val_fraction")
    if test and len(set(test)) < 2:
        raise ConfigError(f"need >= 2 test classes (or none), got {len(set(test))}")


def geometry_transform(pre: Preprocessing, size: Size | None = None) -> v2.Compose:
    """PIL RGB crop → uint8 (3, h, w) tensor (``size``, default ``pre.input_size``), resized as inference resizes."""
    return v2.Compose([v2.PILToTensor(), *resize_transforms(pre, size)])


class LowResolution(torch.nn.Module):
    """With probability ``p``, a uint8 view (3, H, W) as a small photo would show it: shrunk (antialiased,
    bilinear or bicubic at random) to a height of ``sides[0]``–``sides[1]`` px and a width up to ``max_aspect``
    times that (a car in a photo is wider than tall; the view was squashed square), JPEG re-encoded at a random
    quality from ``jpeg`` to 95 when ``jpeg`` > 0, and enlarged back bicubically as inference enlarges a small
    crop. Sides never grow: a view already smaller keeps its size."""

    def __init__(self, p: float, sides: tuple[int, int], max_aspect: float = 2.5, jpeg: int = 0) -> None:
        super().__init__()
        if not (0.0 <= p <= 1.0 and 8 <= sides[0] <= sides[1] and max_aspect >= 1.0 and 0 <= jpeg <= 95):
            raise ConfigError(f"low resolution: bad p={p}, sides={sides}, max_aspect={max_aspect}, jpeg={jpeg}")
        self.p, self.sides, self.max_aspect, self.jpeg = p, sides, max_aspect, jpeg

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        small_h = min(height, int(torch.randint(self.sides[0], self.sides[1] + 1, ())))
        aspect = 1.0 + float(torch.rand(())) * (self.max_aspect - 1.0)
        small = (small_h, min(width, max(8, round(small_h * aspect))))
        modes = (v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC)
        shrunk = v2.functional.resize(image, list(small), modes[int(torch.randint(2, ()))], antialias=True)
        if self.jpeg:
            shrunk = v2.functional.jpeg(shrunk, int(torch.randint(self.jpeg, 96, ())))
        return v2.functional.resize(shrunk, [height, width], v2.InterpolationMode.BICUBIC, antialias=True)


def augment_transform(
    pre: Preprocessing,
    crop_scale: float = 0.6,
    hflip: bool = True,
    jitter: float = 0.0,
    size: Size | None = None,
    grayscale: float = 0.0,
    low_res: LowResolution | None = None,
) -> v2.Compose:
    """uint8 crop in inference geometry → augmented, normalised float (3, h, w) (``size``, default ``input_size``).

    The random crop's aspect range (3/4–4/3 of the input's own w/h) applies to the already squashed (or
    centre-cropped) image, so a training view has the proportions an inference view has; with
    ``crop_scale=1``, no flip and an input already at ``size`` this is the identity followed by
    normalisation, i.e. exactly :func:`eval_transform`. ``low_res`` (:class:`LowResolution`) degrades the
    whole view first, before the random crop.
    """
    height, width = size or pre.input_size
    aspect, mode = width / height, interpolation_mode(pre.interpolation)
    steps: list[torch.nn.Module] = [low_res] if low_res is not None and low_res.p > 0 else []
    steps += [
        v2.RandomResizedCrop(
            (height, width), scale=(crop_scale, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3), interpolation=mode
        )
        if crop_scale < 1
        else v2.Resize((height, width), interpolation=mode)  # the whole image (a random crop could round off a column)
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4))
    if grayscale > 0:
        steps.append(v2.RandomGrayscale(grayscale))  # three equal channels: the view keeps the model's input shape
    return v2.Compose([*steps, *normalise_transforms(pre)])


def crop_config(mode: InputMode, detector: DetectorConfig) -> PipelineConfig:
    """The pipeline settings that crop like ``mode``: whole image, ground-truth box, or detector box (+ margin)."""
    if mode not in ("raw", "gt", "detector"):
        raise ConfigError(f"unknown input mode {mode!r}; valid: raw, gt, detector")
    return PipelineConfig(detector=detector, crop=mode != "raw", crop_source="gt" if mode == "gt" else "detector")


class CropDataset(Dataset):
    """Items → ``(transform(crop), class index, item index)``; the image is cropped as the pipeline would.

    ``classes`` fixes the class indices (0..C-1 in that order); items of other classes are dropped.
    ``detections[i]``: the detector's boxes for item i (mode ``detector`` only; see ``boxcache``).
    """

    def __init__(
        self,
        items: Sequence[SourceItem],
        classes: Sequence[str],
        transform: v2.Transform,
        mode: InputMode = "raw",
        detector: DetectorConfig | None = None,
        detections: Sequence[list[Detection]] | None = None,
    ) -> None:
        self.class_to_index = {name: i for i, name in enumerate(classes)}
        keep = [i for i, item in enumerate(items) if item.label in self.class_to_index]
        self.items = [items[i] for i in keep]
        self.detections = [detections[i] for i in keep] if detections is not None else None
        self.transform = transform
        self.mode = mode
        self.crop = crop_config(mode, detector or DetectorConfig())
        if mode == "gt":
            lacking = [item.path for item in self.items if item.box is None]
            if lacking:
                raise DataSourceError(
                    f"input mode 'gt' needs a box for every image; {len(lacking)} have none (first: {lacking[0]}); "
                    "add x1,y1,x2,y2 columns, or use data.input=detector or raw"
                )
        if mode == "detector" and (self.detections is None or len(self.detections) != len(self.items)):
            raise ConfigError("input mode 'detector' needs the detections of every item (see boxcache.detect_cached)")
        # every kept item has a label (None names no class), so the filter only narrows the type
        self.labels = [self.class_to_index[item.label] for item in self.items if item.label is not None]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        image = load_image(item.path)
        detections = self.detections[index] if self.detections is not None else None
        plan = plan_image(self.crop, image.width, image.height, detections, item.box, single=True)[0]
        return self.transform(apply_plan(image, plan)), self.labels[index], index


class CachedDataset(Dataset):
    """Pre-resized uint8 crops (N, 3, h, w) (e.g. a memory map) → ``(transform(crop), class index, item index)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: v2.Transform) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} cached images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, list(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(torch.from_numpy(np.array(self.images[index]))), self.labels[index], index


def class_counts(items: Sequence[SourceItem]) -> dict[str, int]:
    """Images per label (unlabelled items are not counted)."""
    counts: dict[str, int] = {}
    for item in items:
        if item.label is not None:
            counts[item.label] = counts.get(item.label, 0) + 1
    return counts
