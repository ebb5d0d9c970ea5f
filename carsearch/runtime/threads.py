"""CPU thread settings of torch and faiss (called explicitly; nothing happens at import)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def configure_threads(threads: int | None = None) -> int:
    """Set torch (and faiss) CPU threads; ``None`` → all cores.

    Importing ultralytics sets ``OMP_NUM_THREADS=1`` when unset, which would otherwise pin
    everything to one core.
    """
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    try:
        import faiss

        faiss.omp_set_num_threads(count)
    except (ImportError, AttributeError):  # pragma: no cover - faiss is a dependency
        pass
    logger.debug("using %d CPU threads", count)
    return count
