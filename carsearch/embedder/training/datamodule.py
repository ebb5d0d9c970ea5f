"""The Lightning data module: class-disjoint train/validation/test datasets, PK-sampled training batches."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from carsearch.data.processes import die_with_parent
from carsearch.data.sources import SourceItem, read_source
from carsearch.embedder.preprocessing import Preprocessing, Size, normalise_transforms
from carsearch.embedder.training.boxcache import cache_path, detect_cached
from carsearch.embedder.training.config import DataConfig
from carsearch.embedder.training.data import (
    CachedDataset,
    ClassSplits,
    CropDataset,
    LowResolution,
    augment_transform,
    class_counts,
    geometry_transform,
    split_classes,
)
from carsearch.embedder.training.imagecache import cached_crops
from carsearch.embedder.training.sampler import PKSampler
from carsearch.errors import DataSourceError
from carsearch.types import Detection

logger = logging.getLogger(__name__)


class EmbedderDataModule(L.LightningDataModule):
    """Reads ``config.source``, splits its classes, and serves PK training batches, validation and test sets.

    ``preprocessing``: the model's (sizes, normalisation); validation and test use exactly the inference
    transform. ``cache_dir``: where detector boxes and (``config.cache``) the resized crops are cached
    (without it, resized crops are kept in memory).
    """

    def __init__(
        self,
        config: DataConfig,
        preprocessing: Preprocessing,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        detector_device: str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = preprocessing
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.detector_device = detector_device
        self.items: list[SourceItem] | None = None
        self.splits = ClassSplits([], [], [])
        self.train_set: CropDataset | CachedDataset | None = None
        self.val_set: CropDataset | CachedDataset | None = None
        self.test_set: CropDataset | CachedDataset | None = None
        self._boxes: list[list[Detection]] | None = None

    # ------------------------------------------------------------------ preparation
    def _read(self) -> list[SourceItem]:
        if self.items is None:
            if not self.config.source:
                raise DataSourceError("no training data: set data.source to a folder, CSV, devkit or Kaggle root")
            items = [item for item in read_source(self.config.source, self.config.split) if item.label is not None]
            if not items:
                raise DataSourceError(f"{self.config.source} has no labelled images (labels are needed to train)")
            self.items = items
        return self.items

    def _detections(self, items: list[SourceItem]) -> list[list[Detection]] | None:
        if self.config.input != "detector":
            return None
        if self._boxes is None:
            if self.cache_dir is None:
                raise DataSourceError("input mode 'detector' needs a cache directory for its boxes")
            file = cache_path(self.cache_dir, self.config.detector)
            self._boxes = detect_cached(items, self.config.detector, file, device=self.detector_device)
        return self._boxes

    def prepare_data(self) -> None:
        """Rank 0 only: run the detector over uncached images (mode ``detector``) and fill the image cache."""
        self._detections(self._read())
        if self.config.cache:
            self.setup("fit")

    def _dataset(self, classes: list[str], size: Size, augment: v2.Transform | None) -> CropDataset | CachedDataset:
        """The crops of ``classes`` at ``size`` (h, w) in inference geometry, then ``augment`` (or normalisation)."""
        cfg, pre = self.config, self.preprocessing
        items, detections = self._read(), self._detections(self._read())
        after = augment if augment is not None else v2.Compose(normalise_transforms(pre))
        if not cfg.cache:
            transform = v2.Compose([*geometry_transform(pre, size).transforms, *after.transforms])
            return CropDataset(items, classes, transform, cfg.input, cfg.detector, detections)
        crops = CropDataset(items, classes, geometry_transform(pre, size), cfg.input, cfg.detector, detections)
        geometry = f"{pre.resize}:{pre.interpolation}"
        images, kept = cached_crops(crops, size, geometry, self.cache_dir, workers=cfg.workers)
        return CachedDataset(images, [crops.labels[i] for i in kept], after)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.config
        counts = class_counts(self._read())
        splits = split_classes(
            list(counts),
            cfg.class_split,
            cfg.train_classes,
            cfg.val_classes,
            cfg.test_classes,
            cfg.val_fraction,
            cfg.val_carve,
        )
        if cfg.min_per_class:
            dropped = [c for c in splits.train if counts[c] < cfg.min_per_class]
            if dropped:
                logger.info("dropping %d training classes with < %d images", len(dropped), cfg.min_per_class)
            splits = ClassSplits([c for c in splits.train if counts[c] >= cfg.min_per_class], splits.val, splits.test)
        self.splits = splits
        size = self.preprocessing.input_size
        sides = (cfg.low_res_sides[0], cfg.low_res_sides[1])
        low_res = LowResolution(cfg.low_res, sides, jpeg=cfg.low_res_jpeg) if cfg.low_res > 0 else None
        augment = augment_transform(
            self.preprocessing,
            cfg.crop_scale,
            cfg.hflip,
            cfg.jitter,
            cfg.train_crop_size,
            grayscale=cfg.grayscale,
            low_res=low_res,
        )
        self.train_set = self._dataset(splits.train, cfg.train_size, augment)
        self.val_set = self._dataset(splits.val, size, None) if splits.val else None
        self.test_set = self._dataset(splits.test, size, None) if splits.test else None
        logger.info(
            "classes: %d train (%d images), %d validation (%d images), %d test (%d images)",
            len(splits.train),
            len(self.train_set),
            len(splits.val),
            len(self.val_set or []),
            len(splits.test),
            len(self.test_set or []),
        )

    @property
    def num_train_classes(self) -> int:
        return len(self.splits.train)

    @property
    def train_labels(self) -> list[int]:
        if self.train_set is None:
            raise RuntimeError("call setup() first")
        return list(self.train_set.labels)

    # ------------------------------------------------------------------ loaders
    def batches_per_epoch(self) -> int:
        """``data.batches_per_epoch``, or about one pass over the training images."""
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for batches_per_epoch()")
        return self.config.batches_per_epoch or max(1, len(self.train_set) // self.config.batch_size)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_set is not None
        cfg = self.config
        rank, _ = self._rank()
        sampler = PKSampler(
            self.train_labels,
            cfg.classes_per_batch,
            cfg.images_per_class,
            self.batches_per_epoch(),
            seed=self.seed,
            rank=rank,
        )
        return DataLoader(
            self.train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            worker_init_fn=die_with_parent() if cfg.workers else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []  # no validation classes: a fixed schedule, the last epoch is kept
        return self.eval_loader(self.val_set, distributed=True)

    def eval_loader(self, dataset: Dataset, distributed: bool = False) -> DataLoader:
        """Batches of ``(images, class indices, item indices)`` in order (sharded across DDP ranks)."""
        rank, world_size = self._rank()
        sampler: DistributedSampler[int] | None = (
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
            if world_size > 1 and distributed
            else None
        )
        return DataLoader(
            dataset,
            batch_size=self.config.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.config.workers,
            persistent_workers=self.config.workers > 0,
            worker_init_fn=die_with_parent() if self.config.workers else None,
        )
