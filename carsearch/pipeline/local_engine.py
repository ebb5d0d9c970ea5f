"""The local engine of the batch crop-and-index job: decode in worker processes, detect and embed in batches
in this process, through an :class:`~carsearch.pipeline.index_job.IndexJob` (``ray_engine`` is the Ray Data
one)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from carsearch.data.decode import DecodeDataset, decode_loader
from carsearch.data.sources import SourceItem
from carsearch.pipeline.index_job import IndexJob, IndexReport
from carsearch.pipeline.loaded_models import Models
from carsearch.pipeline.outcomes import attach_vectors, crop_decoded


def run_index_job(
    models: Models,
    items: list[SourceItem],
    out: str | Path,
    options: None = None,
    progress: bool = False,
    prune: bool = False,
) -> IndexReport:
    """Index ``items`` into the directory ``out`` in this process; re-running continues where a killed run
    stopped. ``prune``: also drop indexed images that ``items`` no longer lists (deleted or moved files).
    The local engine takes no ``options`` (the Ray engine's are :class:`~carsearch.pipeline.ray_engine.RayOptions`)."""
    job = IndexJob(models, items, out, progress)
    try:
        runtime = models.config.runtime
        dataset = DecodeDataset(job.items, job.done, runtime.max_image_side)
        for batch in decode_loader(dataset, runtime.batch_size, runtime.workers):
            outcomes, crops = crop_decoded(models, batch, job.timings)
            tic = time.perf_counter()
            vectors = models.embedder.embed(crops) if crops else np.zeros((0, models.embedder.dim), np.float32)
            job.timings["embed"] += time.perf_counter() - tic
            job.record(attach_vectors(outcomes, vectors))
        return job.finish(prune)
    finally:
        job.release()
