"""CAMs over PIL images for an :class:`Embedder`: same preprocessing, maps back at each image's size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from carsearch.embedder import Embedder
from carsearch.explain.cam import EmbeddingCAM, Method
from carsearch.explain.geometry import cam_to_image


class Explainer:
    """Where an embedder looks: ``heatmaps`` for images, ``pair`` for a query and a retrieved image.

    ``batch_size`` images share one forward (and one backward for GradCAM / GradCAM++).
    """

    def __init__(
        self, embedder: Embedder, method: Method = "gradcam", target_layer: str | None = None, batch_size: int = 8
    ) -> None:
        self.embedder = embedder
        self.cam = EmbeddingCAM(embedder.model, method, target_layer)
        self.batch_size = max(1, batch_size)

    @property
    def method(self) -> str:
        return self.cam.method

    def heatmaps(self, images: Sequence[Image.Image], references: np.ndarray | None = None) -> list[np.ndarray]:
        """One (H, W) map in [0, 1] per RGB image, each at that image's size.

        ``references`` (N, D): explain the similarity of image i to reference i; None: to its own embedding.
        """
        if references is not None and len(references) != len(images):
            raise ValueError(f"{len(images)} images but {len(references)} reference embeddings")
        pre = self.embedder.preprocessing
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            refs = None if references is None else references[start : start + len(chunk)]
            maps = self.cam.maps(self.embedder.tensors(chunk), refs)
            out.extend(cam_to_image(m, im.width, im.height, pre) for m, im in zip(maps, chunk, strict=True))
        return out

    def pair(self, query: Image.Image, result: Image.Image) -> tuple[np.ndarray, np.ndarray, float]:
        """(query map w.r.t. the result's embedding, result map w.r.t. the query's, cosine similarity)."""
        vectors = self.embedder.embed([query, result])
        query_map, result_map = self.heatmaps([query, result], vectors[::-1].copy())
        return query_map, result_map, float(vectors[0] @ vectors[1])
