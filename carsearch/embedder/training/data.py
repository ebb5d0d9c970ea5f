"""Training data: class-disjoint splits, crops (raw / ground-truth box / detector box) and their transforms."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from carsearch.config import DetectorConfig, PipelineConfig
from carsearch.embedder.preprocessing import Preprocessing, _interpolation
from carsearch.embedder.training.config import InputMode
from carsearch.errors import ConfigError, DataSourceError
from carsearch.images import load_image
from carsearch.pipeline.cropping import apply_plan, plan_image
from carsearch.pipeline.sources import SourceItem
from carsearch.types import Detection

logger = logging.getLogger(__name__)


def sort_classes(classes: Sequence[str]) -> list[str]:
    """Unique class names, sorted numerically when every name is an integer ("2" before "10"), else by text."""
    unique = set(classes)
    if unique and all(name.strip().lstrip("-").isdigit() for name in unique):
        return sorted(unique, key=lambda name: int(name))
    return sorted(unique)


def split_classes(
    labels: Sequence[str],
    mode: Literal["half", "list"] = "half",
    train_classes: Sequence[str] = (),
    val_classes: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) class lists of ``labels``.

    ``half``: the first half of the sorted classes train, the second half validate (for 196 CARS classes:
    1–98 / 99–196; an odd count gives training the extra class). ``list``: the given ``train_classes``,
    and ``val_classes`` or, when empty, every other class.
    """
    classes = sort_classes(labels)
    if mode == "half":
        if len(classes) < 4:
            raise ConfigError(f"class_split=half needs at least 4 classes (2 + 2), the data has {len(classes)}")
        cut = (len(classes) + 1) // 2
        return classes[:cut], classes[cut:]
    if mode != "list":
        raise ConfigError(f"unknown class split {mode!r}; valid: half, list")
    known = set(classes)
    train = [str(c) for c in train_classes]
    val = [str(c) for c in val_classes] or [c for c in classes if c not in set(train)]
    missing = sorted({*train, *val} - known)
    if missing:
        raise ConfigError(f"class(es) not in the data: {missing[:10]}{' …' if len(missing) > 10 else ''}")
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ConfigError(f"train and validation classes must be disjoint; both have {overlap[:10]}")
    if len(set(train)) < 2 or len(set(val)) < 2:
        raise ConfigError(f"need >= 2 training and >= 2 validation classes, got {len(set(train))} and {len(set(val))}")
    return sort_classes(train), sort_classes(val)


def train_transform(pre: Preprocessing, crop_scale: float = 0.5, hflip: bool = True, jitter: float = 0.2) -> v2.Compose:
    """PIL RGB crop → augmented, normalised (3, S, S) float tensor (S, mean/std, interpolation from ``pre``)."""
    steps: list[v2.Transform] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(
            pre.image_size, scale=(crop_scale, 1.0), interpolation=_interpolation(pre.interpolation), antialias=True
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def crop_config(mode: InputMode, detector: DetectorConfig) -> PipelineConfig:
    """The pipeline settings that crop like ``mode``: whole image, ground-truth box, or detector box (+ margin)."""
    if mode not in ("raw", "gt", "detector"):
        raise ConfigError(f"unknown input mode {mode!r}; valid: raw, gt, detector")
    return PipelineConfig(detector=detector, crop=mode != "raw", crop_source="gt" if mode == "gt" else "detector")


class CropDataset(Dataset):
    """Items → ``(image (3, S, S), class index, item index)``; the image is cropped as the pipeline would.

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
        self.labels = [self.class_to_index[item.label] for item in self.items]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        image = load_image(item.path)
        detections = self.detections[index] if self.detections is not None else None
        plan = plan_image(self.crop, image.width, image.height, detections, item.box, single=True)[0]
        return self.transform(apply_plan(image, plan)), self.labels[index], index


def class_counts(items: Sequence[SourceItem]) -> dict[str, int]:
    """Images per label (unlabelled items are not counted)."""
    counts: dict[str, int] = {}
    for item in items:
        if item.label is not None:
            counts[item.label] = counts.get(item.label, 0) + 1
    return counts
