"""Evaluation of a labelled index: leave-one-out Recall@k, MAP@R and R-Precision, for all its classes and for
the classes its embedder was trained on (seen) and those it never saw (unseen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from carsearch.config import RetrievalConfig
from carsearch.errors import EmptyGalleryError
from carsearch.index import GalleryIndex
from carsearch.metrics import RetrievalMetrics, evaluate_embeddings
from carsearch.types import FLAG_NO_DETECTION


@dataclass(frozen=True)
class ClassGroup:
    """Metrics over the items of one group of classes, searched among themselves (leave-one-out)."""

    classes: int
    items: int
    metrics: RetrievalMetrics | None  # None: fewer than 2 items

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the counts, and the metrics (None below 2 items)."""
        return {"classes": self.classes, "items": self.items, "metrics": self.metrics and self.metrics.to_dict()}


@dataclass(frozen=True)
class Evaluation:
    """Leave-one-out retrieval metrics of a labelled index, with item counts.

    ``seen`` / ``unseen``: the classes the embedder was trained on and those it never saw, each group searched
    among its own items (the CARS196 protocol's test classes are searched so); both None when the embedder
    does not record its training classes. Only ``unseen`` measures generalisation. A label is seen when its
    text equals a training class name exactly (``model``: the embedder, named in the verdict's pointer).
    """

    metrics: RetrievalMetrics
    items: int
    labelled_items: int
    no_detection: int
    seen: ClassGroup | None = None
    unseen: ClassGroup | None = None
    model: str = "MODEL"

    @property
    def verdict(self) -> str:
        """Plain sentences on what the numbers measure and how labels were matched to training classes."""
        if self.seen is None or self.unseen is None:
            return "the embedder does not record its training classes: seen and unseen classes cannot be told apart"
        matched = (
            f"{self.seen.classes} of the index's {self.seen.classes + self.unseen.classes} labels equal a training "
            f"class name of the model (exact text; see `carsearch models {self.model} --classes`). "
        )
        if not self.unseen.classes:
            return matched + (
                f"Every evaluated class ({self.seen.classes}) is a training class of the embedder: "
                "these numbers measure memory, not generalisation to unseen cars"
            )
        if not self.seen.classes:
            return matched + (
                f"No evaluated class is a training class of the embedder: all {self.unseen.classes} are unseen "
                "(labels that name a training class in another spelling, e.g. audi_tts_2012, count as unseen)"
            )
        return matched + (
            f"{self.seen.classes} evaluated classes are training classes of the embedder, {self.unseen.classes} are "
            "unseen: only the unseen classes' numbers measure generalisation"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the metrics of all labelled items at the top level, the counts, each group, the verdict."""
        return {
            **self.metrics.to_dict(),
            "items": self.items,
            "labelled_items": self.labelled_items,
            "no_detection": self.no_detection,
            "seen": self.seen and self.seen.to_dict(),
            "unseen": self.unseen and self.unseen.to_dict(),
            "verdict": self.verdict,
        }


def evaluate_index(gallery: GalleryIndex, retrieval: RetrievalConfig | None = None) -> Evaluation:
    """Leave-one-out metrics over the labelled items of ``gallery`` (unlabelled items are left out), and the
    same for the classes its embedder was trained on and for those it never saw (``Evaluation.seen`` /
    ``unseen``; from the ``train_labels`` its manifest records).

    Searched through the gallery's own index kind (IVF/HNSW as built), so the numbers are the index's; for a
    flat index they equal :func:`carsearch.metrics.leave_one_out_metrics` of its vectors. ``retrieval``:
    the post-processing to measure (DBA, query expansion, k-reciprocal); each query's own item is never a
    candidate.
    """
    labelled = gallery.records.labelled_ids()
    if len(labelled) < 2:
        raise EmptyGalleryError(f"evaluation needs at least 2 labelled items, the index has {len(labelled)}")
    retrieval = retrieval or RetrievalConfig()
    metrics = _leave_one_out(gallery, labelled, retrieval)
    no_detection = gallery.records.count_flag(FLAG_NO_DETECTION)
    trained_on = gallery.manifest.train_labels
    if trained_on is None:
        return Evaluation(metrics, len(gallery), len(labelled), no_detection)
    known = set(trained_on)
    labels = np.array(gallery.records.take(labelled).column("label"), dtype=object)
    is_seen = np.array([label in known for label in labels], dtype=bool)
    groups = []
    for mask in (is_seen, ~is_seen):
        ids = labelled[mask]
        group = _leave_one_out(gallery, ids, retrieval) if len(ids) >= 2 else None
        groups.append(ClassGroup(len(set(labels[mask])), len(ids), group))
    model = gallery.manifest.model_name or "MODEL"
    return Evaluation(metrics, len(gallery), len(labelled), no_detection, groups[0], groups[1], model)


def _leave_one_out(gallery: GalleryIndex, ids: np.ndarray, retrieval: RetrievalConfig) -> RetrievalMetrics:
    """Metrics of the items ``ids`` (labelled) searched among themselves."""
    sub = GalleryIndex(gallery.dim, gallery.manifest, gallery.config)
    sub.add(gallery.vectors[ids], gallery.records.take(ids))
    labels = sub.records.column("label")
    if retrieval.plain:
        return evaluate_embeddings(lambda k: sub.search(sub.vectors, k)[1], labels)
    itself = [{i} for i in range(len(sub))]
    return evaluate_embeddings(lambda k: sub.retrieve(sub.vectors, k, retrieval, exclude=itself)[1], labels)
