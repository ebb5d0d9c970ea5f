"""The demo's loaded models and indexes, shared by the page and the JSON API, and the limits on uploads.

``DemoBackend.load`` loads the detector and embedder once; the GradCAM model (a torch graph with hooks) is
made on the first explanation, so a server that only answers searches never builds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from carsearch.config import DetectorConfig
from carsearch.data.images import limit_size
from carsearch.data.storage import is_uri
from carsearch.demo.batching import Batcher
from carsearch.errors import CarSearchError, IndexMismatchError
from carsearch.explain import Explainer
from carsearch.explain.cam import Method
from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline

DETECTOR_FLOOR = 0.05  # the detector runs at this confidence; the slider filters above it
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # uploads above this are refused (page and API); pixels: decode_image's guard
MAX_BATCH = 16  # concurrent searches run together: one detector and one embedder call per batch
BATCH_WINDOW_S = 0.01  # how long the first search of a batch waits for others
MAX_K = 50  # the most hits one search returns


def release_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Decoding photos and GradCAM's backward pass free hundreds of MB that glibc keeps in per-thread arenas:
    measured on the demo, RSS after the first explanation fell from 1.8 GB to 1.3 GB.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


@dataclass
class Side:
    """One index and the pipeline that queries it exactly as it was built; its CAM explainer made on first use."""

    name: str
    pipeline: Pipeline
    gallery: GalleryIndex
    method: Method = "gradcam"
    _explainer: Explainer | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def explainer(self) -> Explainer:
        with self._lock:
            if self._explainer is None:
                self._explainer = Explainer(self.pipeline.embedder, self.method)
            return self._explainer

    @property
    def explainer_loaded(self) -> bool:
        return self._explainer is not None


def _side(name: str, index: str | Path, overrides: list[str], method: Method, share: Side | None = None) -> Side:
    pipeline = Pipeline.for_index(index, overrides)
    gallery = None
    if share is not None:  # same embedder for both indexes: load it once
        shared = Pipeline(pipeline.config, embedder=share.pipeline.embedder)
        try:
            pipeline, gallery = shared, shared.open_index(index)
        except IndexMismatchError:
            pass  # another embedder: this index gets its own
    if gallery is None:
        gallery = pipeline.open_index(index)
    if pipeline.config.crop:
        _ = pipeline.detector  # load now, not on the first request
    return Side(name, pipeline, gallery, method)


@dataclass
class DemoBackend:
    """The loaded models and indexes: ``main`` (usually cropped) and an optional ``raw`` index.

    ``batcher``: the queue every search goes through (made on the first search, see
    :func:`carsearch.demo.searching.ask`), so concurrent searches share model calls.
    """

    main: Side
    raw: Side | None = None
    default_confidence: float = DetectorConfig().confidence
    batcher: Batcher[Any, Any] | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(
        cls,
        index: str | Path,
        raw_index: str | Path | None = None,
        model: str | None = None,
        overrides: list[str] | None = None,
        method: Method = "gradcam",
    ) -> DemoBackend:
        """Load the index(es) and their models once (``model``: the model both indexes were built with, where
        the manifest's path no longer finds it; by default each index's own)."""
        extra = list(overrides or []) + ([f"embedder.model={model}"] if model else [])
        default_confidence = Pipeline.for_index(index, extra).config.detector.confidence
        main = _side("cropped", index, [*extra, f"detector.confidence={DETECTOR_FLOOR}"], method)
        raw = _side("raw", raw_index, extra, method, share=main) if raw_index else None
        if not len(main.gallery):
            raise CarSearchError(f"index {index} is empty: add images with `carsearch index` first")
        return cls(main, raw, default_confidence)

    @property
    def sides(self) -> list[Side]:
        """The indexes searched, main first."""
        return [self.main] if self.raw is None else [self.main, self.raw]

    def prepare(self, image: Image.Image) -> Image.Image:
        """A decoded upload downscaled at once to the indexes' ``runtime.max_image_side`` (what every search does
        first), so queued searches hold small pictures; left as is when the indexes differ in it."""
        sides = {side.pipeline.config.runtime.max_image_side for side in self.sides}
        return limit_size(image, sides.pop())[0] if len(sides) == 1 else image

    def examples(self, count: int = 8) -> list[str]:
        """Paths of up to ``count`` indexed images, one per label where possible, that still exist (local files
        only: Gradio's examples cannot read an object store)."""
        seen: set[str | None] = set()
        picked: list[str] = []
        for record in self.main.gallery.records:
            if len(picked) >= count:
                break
            if record.label in seen or is_uri(record.path) or not Path(record.path).is_file():
                continue
            seen.add(record.label)
            picked.append(record.path)
        return picked

    def close(self) -> None:
        """Stop the search queue (after the searches already queued)."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
