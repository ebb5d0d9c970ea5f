"""The models a pipeline runs, loaded on first use: what the index engines and their stages take.

Like ultralytics' ``Model`` holding its predictor, :class:`~carsearch.pipeline.Pipeline` holds one
:class:`Models`; the engines (``local_engine``, ``ray_engine``) and the Ray actors take a :class:`Models`, never
the front door, so no module of this package imports the one above it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from carsearch.config import PipelineConfig
from carsearch.config_files import to_dict
from carsearch.data import storage
from carsearch.detector import VehicleDetector
from carsearch.embedder import Embedder, zoo
from carsearch.index.manifest import Manifest
from carsearch.runtime.device import resolve_device
from carsearch.runtime.threads import configure_threads
from carsearch.runtime.versions import versions


class Models:
    """One :class:`PipelineConfig`, its detector and embedder (each loaded lazily and once), and the manifest
    that says how they make vectors. The detector loads only when cropping needs it."""

    def __init__(
        self, config: PipelineConfig, detector: VehicleDetector | None = None, embedder: Embedder | None = None
    ) -> None:
        self.config = config
        self.device = resolve_device(config.runtime.device)
        configure_threads(config.runtime.threads)
        self._detector = detector
        self._embedder = embedder

    @property
    def detector(self) -> VehicleDetector:
        """The config's detector, loaded on first use (with the config's thread count kept afterwards)."""
        if self._detector is None:
            threads = configure_threads(self.config.runtime.threads)
            self._detector = VehicleDetector(self.config.detector, device=str(self.device), threads=threads)
            configure_threads(self.config.runtime.threads)  # importing ultralytics pins OMP to one thread
        return self._detector

    @property
    def embedder(self) -> Embedder:
        """The config's embedder on this device, loaded on first use."""
        if self._embedder is None:
            self._embedder = Embedder.from_config(self.config.embedder, self.device)
        return self._embedder

    def manifest(self) -> Manifest:
        """How these models make vectors (a fresh, unsaved manifest each call); stored with every index they build."""
        return Manifest(
            embedder=self.embedder.identity,
            processing=processing_of(self.config),
            config=located_config(self.config, self._embedder_backbone()),
            versions=versions(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    @property
    def detector_loaded(self) -> bool:
        """Whether the detector has been loaded (it loads on first use)."""
        return self._detector is not None

    def _embedder_backbone(self) -> str:
        """The backbone the embedder really runs (a checkpoint's own, not ``embedder.backbone``)."""
        return str(self.embedder.identity.get("spec", {}).get("backbone") or self.config.embedder.backbone)


def processing_of(config: PipelineConfig) -> dict[str, Any]:
    """The settings besides the embedder that decide an index's vectors (its manifest's ``processing``):
    crop or raw, where boxes come from, the detector's settings (its weights by file name), the image limit."""
    det, detector = config.detector, None
    if config.crop:
        detector = {
            "weights": storage.name(det.weights),
            "classes": sorted(det.classes),
            "confidence": det.confidence,
            "iou": det.iou,
            "image_size": det.image_size,
            "margin": det.margin,
            "selection": det.selection,
            "min_box_size": det.min_box_size,
        }
        if det.fallback_confidence is not None:  # absent otherwise: indexes from before it still resume
            detector["fallback_confidence"] = det.fallback_confidence
        if not det.enlarge_small:  # likewise: indexes from before it enlarged small images
            detector["enlarge_small"] = False
    return {
        "crop": config.crop,
        "crop_source": config.crop_source,
        "detector": detector,
        "max_image_side": config.runtime.max_image_side,  # queries are downscaled alike
    }


def located_config(config: PipelineConfig, backbone: str) -> dict[str, Any]:
    """``config`` as stored in a manifest: local paths absolute (a manifest never depends on the folder it was
    written from) and the embedder's real backbone."""
    data = to_dict(config)
    model = config.embedder.model
    if not zoo.is_name(model) and model != zoo.IMAGENET and not storage.is_uri(model) and Path(model).exists():
        data["embedder"]["model"] = os.path.abspath(Path(model).expanduser())
    data["embedder"]["backbone"] = backbone
    return data
