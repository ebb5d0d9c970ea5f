"""PK batches (P classes × K images) with pytorch-metric-learning's ``MPerClassSampler``, validated up front."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
from pytorch_metric_learning.samplers import MPerClassSampler

from carsearch.errors import ConfigError

logger = logging.getLogger(__name__)


def check_pk(labels: Sequence[int], classes_per_batch: int, images_per_class: int, batch_size: int) -> None:
    """Raise :class:`ConfigError` unless ``labels`` can fill ``batch_size`` = P × K batches.

    A class with fewer than K images is not an error: ``MPerClassSampler`` then draws its images with
    replacement (repeats within a batch); it is logged, and ``data.min_per_class`` drops such classes.
    """
    if batch_size % images_per_class:
        raise ConfigError(
            f"batch size {batch_size} is not a multiple of images_per_class (K) = {images_per_class}; "
            f"use classes_per_batch × images_per_class"
        )
    counts = Counter(labels)
    if len(counts) < classes_per_batch:
        raise ConfigError(
            f"a batch needs classes_per_batch (P) = {classes_per_batch} classes but the training split has only "
            f"{len(counts)}; lower data.classes_per_batch or train on more classes"
        )
    short = sorted(label for label, count in counts.items() if count < images_per_class)
    if short:
        logger.warning(
            "%d of %d training classes have fewer than K=%d images; their images repeat within a batch "
            "(set data.min_per_class=%d to drop them)",
            len(short),
            len(counts),
            images_per_class,
            images_per_class,
        )


class PKSampler(MPerClassSampler):
    """``MPerClassSampler`` whose draws come from its own seeded RNG (per seed, rank and epoch).

    PML's sampler draws from the global NumPy RNG, which ``seed_everything`` makes identical on every DDP
    rank (every rank would see the same batches); here each rank and epoch gets its own stream, and a run
    is reproducible. Lightning calls :meth:`set_epoch`.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        images_per_class: int,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        batch_size = classes_per_batch * images_per_class
        check_pk(labels, classes_per_batch, images_per_class, batch_size)
        if batches_per_epoch < 1:
            raise ConfigError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        super().__init__(
            np.asarray(labels),
            m=images_per_class,
            batch_size=batch_size,
            length_before_new_iter=batches_per_epoch * batch_size,
        )
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        state = np.random.get_state()
        np.random.seed((self.seed * 1_000_003 + self.rank * 10_007 + self.epoch) % 2**32)
        try:
            self.labels.sort()  # the parent shuffles this list in place: start every epoch from the same order
            return super().__iter__()  # builds the whole index list eagerly
        finally:
            np.random.set_state(state)
