"""The front door: ``Pipeline.from_config(...)`` then ``.index(...)``, ``.search(...)``, ``.evaluate(...)``.

It composes the stages (detector → crop → embedder → index) and holds no model logic of its own.

Example::

    pipe = Pipeline.from_config(overrides=["detector.weights=../shared/models/yolov8n_coco_int8.tflite"])
    report = pipe.index("photos/", "my_index")
    result = Pipeline.for_index("my_index").search("my_index", "query.jpg", k=5)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carsearch.config import PipelineConfig, load_config
from carsearch.config_files import apply_overrides, from_dict, to_dict
from carsearch.data.cropping import apply_plan, needs_detector, plan_image, plan_in_original
from carsearch.data.images import ImageInput, as_image, content_hash, limit_size
from carsearch.data.sources import Split, read_source
from carsearch.detector import VehicleDetector
from carsearch.embedder import Embedder
from carsearch.errors import ConfigError, EmptyGalleryError
from carsearch.index import GalleryIndex, Manifest
from carsearch.pipeline.evaluation import Evaluation, evaluate_index
from carsearch.pipeline.index_job import IndexReport
from carsearch.pipeline.index_settings import index_config, update_config
from carsearch.pipeline.loaded_models import Models
from carsearch.pipeline.local_engine import run_index_job
from carsearch.pipeline.queries import at_min_score, gallery_hits
from carsearch.pipeline.ray_engine import RayOptions, run_ray_index_job
from carsearch.types import BBox, CropPlan, Engine, SearchResult

logger = logging.getLogger(__name__)

# engine name -> the function that runs the batch job (models, items, out, options, progress=, prune=)
ENGINES: dict[Engine, Callable[..., IndexReport]] = {"local": run_index_job, "ray": run_ray_index_job}


class Pipeline:
    """Detect → crop → embed → index/search, configured by one :class:`PipelineConfig`.

    Its :class:`~carsearch.pipeline.loaded_models.Models` load lazily on first use and once per pipeline; the
    detector loads only when cropping needs it.
    """

    def __init__(
        self, config: PipelineConfig, detector: VehicleDetector | None = None, embedder: Embedder | None = None
    ) -> None:
        self.models = Models(config, detector, embedder)

    @property
    def config(self) -> PipelineConfig:
        """The pipeline config every stage follows (its :class:`Models`')."""
        return self.models.config

    @property
    def device(self) -> torch.device:
        """The device the models run on, resolved once from ``runtime.device``."""
        return self.models.device

    @property
    def detector(self) -> VehicleDetector:
        """The detector, loaded on first use."""
        return self.models.detector

    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded on first use."""
        return self.models.embedder

    def manifest(self) -> Manifest:
        """How this pipeline makes vectors; stored with every index it builds."""
        return self.models.manifest()

    @classmethod
    def from_config(
        cls, config: PipelineConfig | str | Path | None = None, overrides: list[str] | None = None
    ) -> Pipeline:
        """From a config object, a YAML path, or defaults, plus ``section.key=value`` overrides."""
        if isinstance(config, PipelineConfig):
            if overrides:
                config = from_dict(PipelineConfig, apply_overrides(to_dict(config), overrides))
            return cls(config)
        return cls(load_config(config, overrides))

    @classmethod
    def for_index(cls, index_dir: str | Path, overrides: list[str] | None = None) -> Pipeline:
        """A pipeline that processes queries exactly as the index at ``index_dir`` was built, from any folder
        (its detector weights from the index's own copy), with ``section.key=value`` overrides on top."""
        return cls(index_config(index_dir, overrides))

    @classmethod
    def for_update(
        cls, index_dir: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
    ) -> Pipeline:
        """A pipeline that adds images to the existing index at ``index_dir`` with its own settings; ``config``
        (a YAML path or shipped name) and ``overrides`` may change how the job runs, not how vectors are made
        (:func:`~carsearch.pipeline.index_settings.update_config`)."""
        return cls(update_config(index_dir, config, overrides))

    # -- single images -------------------------------------------------------------------------------

    def plan(
        self, image: Image.Image, gt_box: BBox | None = None, single: bool = True, min_score: float | None = None
    ) -> list[CropPlan]:
        """Crop plans for one RGB image (detector runs only when needed). ``min_score`` raises
        ``detector.confidence`` for this image; ``detector.fallback_confidence`` still applies below it."""
        detections = self.detector.detect([image])[0] if needs_detector(self.config, gt_box) else None
        config = at_min_score(self.config, min_score)
        return plan_image(config, image.width, image.height, detections, gt_box, single=single)

    def embed_image(
        self, image: Image.Image, gt_box: BBox | None = None, min_score: float | None = None
    ) -> tuple[CropPlan, Image.Image, np.ndarray]:
        """(plan in ``image``'s pixels, crop, vector (D,)) for the one car of a query image.

        Prepared exactly as the batch job prepares a gallery image (downscaled to ``runtime.max_image_side``
        before detection and cropping), so an indexed image searched as a query gets its own vector back.
        """
        small, scale = limit_size(image, self.config.runtime.max_image_side)
        gt_box = gt_box.scale(scale) if gt_box is not None else None
        plan = self.plan(small, gt_box, single=True, min_score=min_score)[0]
        crop = apply_plan(small, plan)
        return plan_in_original(plan, scale), crop, self.embedder.embed([crop])[0]

    # -- jobs ----------------------------------------------------------------------------------------

    def index(
        self,
        source: str | Path,
        out: str | Path,
        split: Split = "all",
        progress: bool = False,
        where: dict[str, str] | None = None,
        prune: bool = False,
        engine: Engine = "local",
        ray: RayOptions | None = None,
    ) -> IndexReport:
        """Crop-and-index a folder / CSV / devkit / Kaggle dataset into the index directory ``out``.

        ``where`` keeps only CSV rows with these column values (e.g. ``{"box_fully_visible": "1"}``).
        ``prune``: drop indexed images the source no longer lists. ``engine``: ``local`` (this process and
        its decode workers) or ``ray`` (Ray Data actors; ``ray`` options: cluster address, pool sizes, GPUs).
        """
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
        if ray is not None and engine != "ray":
            raise ConfigError("Ray options need engine='ray'")
        items = read_source(source, split, where, non_images=True)  # recorded in errors.jsonl, never read
        return ENGINES[engine](self.models, items, out, ray, progress=progress, prune=prune)

    def open_index(self, index_dir: str | Path) -> GalleryIndex:
        """Load an index, refusing one built with a different embedder."""
        return GalleryIndex.load(index_dir, self.config.index, embedder_identity=self.embedder.identity)

    def search(
        self,
        index: GalleryIndex | str | Path,
        query: ImageInput,
        k: int = 10,
        exclude_self: bool = False,
        min_score: float | None = None,
    ) -> SearchResult:
        """Top-``k`` gallery items for the car in ``query``: a path or URI, encoded bytes, a PIL image in any
        mode or a uint8 array (H, W, 3) RGB — each prepared exactly as the same picture read from a file.

        ``exclude_self`` drops gallery items with the query's exact bytes (paths, URIs and bytes only).
        ``min_score``: this query's detector confidence, above the config's (the demo's slider); the
        fallback box below it still applies.
        """
        tic = time.perf_counter()
        gallery = index if isinstance(index, GalleryIndex) else self.open_index(index)
        if not len(gallery):
            raise EmptyGalleryError("the index is empty: add images with `carsearch index` first")
        image, data = as_image(query)  # a file is read once: hashed for exclude_self and decoded
        query_hash = content_hash(data) if exclude_self and data is not None else None
        timings = {"load": (time.perf_counter() - tic) * 1000}
        tic = time.perf_counter()
        plan, crop, vector = self.embed_image(image, min_score=min_score)
        timings["detect_embed"] = (time.perf_counter() - tic) * 1000
        tic = time.perf_counter()
        excluded = {int(i) for i in gallery.records.ids_with_hash(query_hash)} if query_hash else set()
        hits = gallery_hits(self.models, gallery, vector, k, excluded)
        timings["search"] = (time.perf_counter() - tic) * 1000
        reranked = self.config.retrieval.kreciprocal
        return SearchResult(plan, hits, timings_ms=timings, query_crop=crop, reranked=reranked)

    def evaluate(self, index: GalleryIndex | str | Path) -> Evaluation:
        """Leave-one-out Recall@1/2/4/8, MAP@R and R-Precision over the labelled items of an index, searched
        with this pipeline's ``retrieval`` post-processing (plain search when it is off)."""
        gallery = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index, self.config.index)
        return evaluate_index(gallery, self.config.retrieval)
