"""The Lightning data module: class-disjoint train/val datasets, PK-sampled training batches."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from carsearch.embedder.preprocessing import Preprocessing, eval_transform
from carsearch.embedder.training.boxcache import cache_path, detect_cached
from carsearch.embedder.training.config import DataConfig
from carsearch.embedder.training.data import CropDataset, class_counts, split_classes, train_transform
from carsearch.embedder.training.sampler import PKSampler
from carsearch.errors import DataSourceError
from carsearch.pipeline.sources import SourceItem, read_source
from carsearch.types import Detection

logger = logging.getLogger(__name__)


class EmbedderDataModule(L.LightningDataModule):
    """Reads ``config.source``, splits its classes, and serves PK training batches and a validation set.

    ``preprocessing``: the model's (sizes, normalisation); validation uses exactly the inference transform.
    ``cache_dir``: where detector boxes are cached (input mode ``detector``).
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
        self.train_classes: list[str] = []
        self.val_classes: list[str] = []
        self.train_set: CropDataset | None = None
        self.val_set: CropDataset | None = None
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
        """Rank 0 only: run the detector over uncached images (mode ``detector``)."""
        self._detections(self._read())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.config
        items = self._read()
        counts = class_counts(items)
        train_classes, val_classes = split_classes(list(counts), cfg.class_split, cfg.train_classes, cfg.val_classes)
        if cfg.min_per_class:
            dropped = [c for c in train_classes if counts[c] < cfg.min_per_class]
            if dropped:
                logger.info("dropping %d training classes with < %d images", len(dropped), cfg.min_per_class)
            train_classes = [c for c in train_classes if counts[c] >= cfg.min_per_class]
        detections = self._detections(items)  # read from the cache prepare_data filled
        self.train_classes, self.val_classes = train_classes, val_classes
        augment = train_transform(self.preprocessing, cfg.crop_scale, cfg.hflip, cfg.jitter)
        self.train_set = CropDataset(items, train_classes, augment, cfg.input, cfg.detector, detections)
        self.val_set = CropDataset(
            items, val_classes, eval_transform(self.preprocessing), cfg.input, cfg.detector, detections
        )
        logger.info(
            "training on %d images of %d classes, validating on %d images of %d other classes",
            len(self.train_set),
            len(train_classes),
            len(self.val_set),
            len(val_classes),
        )

    @property
    def num_train_classes(self) -> int:
        return len(self.train_classes)

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
            self.train_set.labels,
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
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_set is not None
        rank, world_size = self._rank()
        sampler = (
            DistributedSampler(self.val_set, num_replicas=world_size, rank=rank, shuffle=False)
            if world_size > 1
            else None
        )
        return DataLoader(
            self.val_set,
            batch_size=self.config.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.config.workers,
            persistent_workers=self.config.workers > 0,
        )
