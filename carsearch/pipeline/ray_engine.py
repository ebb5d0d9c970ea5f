"""The batch job on Ray Data: decode tasks → detector actors (detect + crop) → embedder actors, streamed in
source order to this process, which writes Parquet chunks and merges them exactly like the local engine.
This module is the driver's side; what runs in Ray's workers is :mod:`carsearch.pipeline.ray_workers`.

Same resume state, chunk rules, errors and atomic save as :func:`carsearch.pipeline.local_engine.run_index_job`
(both go through :class:`~carsearch.pipeline.index_job.IndexJob`), so an index cannot tell which engine
built it. Without an address a local Ray cluster is started for the job and torn down after it, even
when the job is killed (:class:`~carsearch.data.processes.ProcessSweeper`). Needs ``pip install
'carsearch[ray]'``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carsearch.config import PipelineConfig
from carsearch.config_files import to_dict
from carsearch.data.processes import ProcessSweeper
from carsearch.data.sources import SourceItem
from carsearch.embedder import zoo
from carsearch.errors import ConfigError
from carsearch.index.records import ItemRecord
from carsearch.pipeline.index_job import IndexJob, IndexReport
from carsearch.pipeline.loaded_models import Models
from carsearch.pipeline.outcomes import Outcome
from carsearch.pipeline.ray_workers import DECODE_CPUS, CropActor, EmbedActor, decode_batch

logger = logging.getLogger(__name__)

MARKER = "CARSEARCH_RAY_JOB"  # environment variable that marks the processes of a job's local cluster


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    ``address``: an existing cluster (``ray start --head`` / KubeRay; ``auto`` finds a local one); None
    starts a local cluster with ``num_cpus`` (None: all cores) for this job only. ``detector_actors`` and
    ``embedder_actors``: pool sizes (``(min, max)`` autoscaling when max > min); None: see
    :func:`default_pools`. ``gpus_per_actor``: GPUs
    each embedder actor reserves (fractional allowed); None: 1 when the cluster has GPUs, else 0.
    """

    address: str | None = None
    num_cpus: int | None = None
    detector_actors: tuple[int, int] | None = None
    embedder_actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("the Ray engine needs Ray Data: pip install -e '.[ray]'") from exc
    return ray


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray, connected for the block: a fresh local cluster (killed afterwards) or ``options.address``."""
    ray = _ray()
    if ray.is_initialized():  # the caller's own session: use it, leave it running
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sweeper = ProcessSweeper(MARKER) if options.address is None else None
    try:
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if options.address is None:
            kwargs.update(num_cpus=options.num_cpus or os.cpu_count() or 1, include_dashboard=False)
        ray.init(address=options.address, **kwargs)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the driver reports progress itself
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if sweeper is not None:
            sweeper.stop()


def run_ray_index_job(
    models: Models,
    items: list[SourceItem],
    out: str | Path,
    options: RayOptions | None = None,
    progress: bool = False,
    prune: bool = False,
) -> IndexReport:
    """:func:`~carsearch.pipeline.local_engine.run_index_job` with the stages on Ray Data actors."""
    options = options or RayOptions()
    job = IndexJob(models, items, out, progress, chunk_format="parquet")
    try:
        if not job.items:
            return job.finish(prune)
        with ray_session(options) as ray:
            dataset = _dataset(ray, job, models.config, options)
            grouper = OutcomeGrouper()
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    job.timings["detect"] += float(np.sum(batch["detect_s"]))
                    job.timings["embed"] += float(np.sum(batch["embed_s"]))
                    job.record(grouper.add(batch))
                job.record(grouper.finish())
            finally:
                job.close()
        return job.finish(prune)
    finally:
        job.release()


def _dataset(ray: Any, job: IndexJob, config: PipelineConfig, options: RayOptions) -> Any:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # outcomes reach the chunks in source order
    context.enable_progress_bars = False
    batch = config.runtime.batch_size
    resources = ray.cluster_resources()
    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and config.runtime.device != "cpu" else 0.0
    settings = _absolute_paths(to_dict(config))
    gpu_actors = int(resources.get("GPU", 0) / gpus + 1e-9) if gpus > 0 else 0
    detectors, embedders = default_pools(resources.get("CPU", 1.0), gpu_actors)
    detectors, embedders = options.detector_actors or detectors, options.embedder_actors or embedders
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    actors = max(detectors) + max(embedders)
    cpus = actor_cpus(nodes, actors)
    return (
        ray.data.from_arrow(input_blocks(job.items, job.done, batch))
        .map_batches(decode_batch, batch_size=batch, num_cpus=DECODE_CPUS,
                     concurrency=decode_slots(nodes, actors, cpus),
                     fn_kwargs={"max_side": config.runtime.max_image_side})
        .map_batches(CropActor, batch_size=batch, fn_constructor_args=(settings,),
                     compute=_pool(ray, detectors), num_cpus=cpus)
        .map_batches(EmbedActor, batch_size=batch, fn_constructor_args=(settings,),
                     compute=_pool(ray, embedders), num_cpus=cpus, num_gpus=gpus)
    )  # fmt: skip


def _absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """The config with relative model paths that exist here made absolute: actors need not share our cwd."""
    for section, key in (("detector", "weights"), ("embedder", "model")):
        value = settings[section].get(key)
        if value and not zoo.is_name(value) and not Path(value).is_absolute() and Path(value).exists():
            settings[section][key] = str(Path(value).resolve())
    return settings


MAX_INPUT_BLOCKS = 1024  # Ray Data pays per block: per-block overhead dominates at 1M rows (docs/scale-out.md)


def input_blocks(items: Sequence[SourceItem], indexed: dict[str, str], batch: int) -> list[Any]:
    """The job's rows as Arrow tables, one per Ray Data block: ``position``, ``item`` (path, label and box as
    JSON) and ``indexed`` (the content hash the index holds for the path, or ""). Each row carries its own
    hash rather than every decode task receiving the whole path -> hash table (10M entries when a large
    job resumes). A block is one batch, or several once the job would need more than
    ``MAX_INPUT_BLOCKS`` (from 32k images at batch 32)."""
    import pyarrow as pa

    paths = [str(it.path) for it in items]
    table = pa.table(
        {
            "position": pa.array(range(len(items)), pa.int64()),
            "item": [
                json.dumps([p, it.label, it.box.as_list() if it.box else None, it.skip_reason])
                for p, it in zip(paths, items, strict=True)
            ],
            "indexed": [indexed.get(p, "") for p in paths],
        }
    )
    rows = batch * max(1, -(-len(items) // (batch * MAX_INPUT_BLOCKS)))
    return [table.slice(start, rows) for start in range(0, len(items), rows)]


DECODE_SHARE = 0.25  # of the cluster's CPUs left to decoding by the default pools


def default_pools(cluster_cpus: float, gpu_actors: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """(detector, embedder) actor pool sizes: three quarters of the CPUs, shared equally (at least one actor
    each); the last quarter decodes (``DECODE_SHARE``: sized for street photos; decoding costs next to
    nothing beside the models for a thumbnail and more than both of them for a 12 MP frame;
    ``benchmarks/stage_costs.py``, docs/scale-out.md). When the embedders run on GPUs: one embedder actor per
    ``gpu_actors`` (the cluster's GPUs / GPUs per actor), the detectors take the rest. On 2 cores this is
    1 + 1: 2 detector actors + 1 embedder actor were no faster and slower to start (docs/scale-out.md)."""
    budget = max(2, int(cluster_cpus * (1 - DECODE_SHARE)))
    embedders = gpu_actors or budget // 2
    detectors = max(1, budget - embedders)
    return (detectors, detectors), (embedders, embedders)


def decode_slots(node_cpus: Sequence[float], actors: int, share: float) -> int:
    """How many decode tasks may run at once: the CPUs the actors leave free (at least one). Each task
    reserves only ``DECODE_CPUS`` so that one fits beside the actors on a small node, but it keeps a core
    busy while it runs: without this cap, four would run per free CPU."""
    return max(1, int(sum(node_cpus) - actors * share + 1e-9))


def actor_cpus(node_cpus: Sequence[float], actors: int) -> float:
    """Logical CPUs per actor (at most 1: each runs one thread), as large as can be while the cluster holds
    ``actors`` (both pools at their largest) and no placement Ray may choose leaves every node without room
    for a decode task. Otherwise the job waits forever: on two 1-CPU nodes, two actors of 0.875 CPU left
    0.125 on each, and it hung (found on a simulated two-node cluster)."""
    unit = 10_000  # Ray counts resources in steps of 1e-4
    nodes = Counter(round(c * unit) for c in node_cpus if c > 0)  # node size -> how many nodes of it
    decode = round(DECODE_CPUS * unit)
    for share in range(unit, unit // 100 - 1, -10):  # 1.000, 0.999, ... 0.010 CPU per actor
        if sum((size // share) * count for size, count in nodes.items()) < actors:
            continue  # the pools cannot all start
        starving = 0  # actors it takes to leave every node with less than a decode task needs
        for size, count in nodes.items():
            needed = (size - decode) // share + 1 if size >= decode else 0
            if needed * share > size:
                break  # this node can never be filled that far: decoding always finds room here
            starving += needed * count
        else:
            if starving <= actors:
                continue
        return share / unit
    raise ConfigError(
        f"{actors} actors do not fit beside the decode tasks on this cluster (CPUs per node: "
        f"{sorted(node_cpus)}): pass fewer with --ray-actors D,E"
    )


def _pool(ray: Any, sizes: tuple[int, int]) -> Any:
    return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=max(sizes))


class OutcomeGrouper:
    """Regroups the embedder's rows (one per crop; an image's first row is its ``head``) into one
    :class:`Outcome` per image. An image's rows may span batches: the last one is held back until the next
    head (or :meth:`finish`) shows it complete."""

    def __init__(self) -> None:
        self._open: Outcome | None = None
        self._vectors: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> list[Outcome]:
        """The outcomes this batch completes, in order."""
        done: list[Outcome] = []
        for kind, head, meta, vector in zip(batch["kind"], batch["head"], batch["meta"], batch["vector"], strict=True):
            data = json.loads(meta)
            if head:
                done.extend(self.finish())
                self._open = Outcome(data["path"], str(kind))
            if self._open is None or self._open.path != data["path"]:
                raise RuntimeError(f"Ray engine: rows of {data['path']} arrived without their first row")
            if kind == "ok":
                self._open.records.append(ItemRecord.from_dict(data["entry"]))
                self._vectors.append(np.asarray(vector, np.float32))
            elif kind == "error":
                self._open.error = data["entry"]
        return done

    def finish(self) -> list[Outcome]:
        """The outcome still open, if any (call after the last batch)."""
        if self._open is None:
            return []
        outcome, self._open = self._open, None
        if outcome.status == "ok":
            outcome.vectors = np.stack(self._vectors)
        self._vectors = []
        return [outcome]
