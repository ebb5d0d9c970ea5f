"""Label audit of an index: items whose neighbours disagree with their label, and duplicates labelled differently."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from carsearch.errors import EmptyGalleryError
from carsearch.index import GalleryIndex, ItemRecord

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Disagreement:
    """An item whose ``k`` nearest neighbours mostly carry another label (a relabelling candidate)."""

    item_id: int
    path: str
    label: str
    agree: float  # share of the k neighbours with the item's own label
    majority_label: str
    majority_share: float


@dataclass(frozen=True)
class DuplicatePair:
    """Two items with identical bytes (``exact``) or near-identical embeddings, labelled differently."""

    path_a: str
    label_a: str
    path_b: str
    label_b: str
    kind: str  # "exact" | "near"
    similarity: float


@dataclass(frozen=True)
class AuditReport:
    """Relabelling candidates of an index: items outvoted by their neighbours' labels, and duplicate pairs."""

    disagreements: list[Disagreement]
    duplicates: list[DuplicatePair]
    items: int
    k: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON: the counts, then every disagreement and duplicate pair as its fields."""
        return {
            "items": self.items,
            "k": self.k,
            "disagreements": [asdict(d) for d in self.disagreements],
            "duplicates": [asdict(d) for d in self.duplicates],
        }


def audit_index(gallery: GalleryIndex, k: int = 10, max_agree: float = 0.2, near: float = 0.995) -> AuditReport:
    """Relabelling candidates among the labelled items of ``gallery``.

    Disagreements: items with at most ``max_agree`` of their ``k`` neighbours (self excluded) sharing their
    label, sorted by how strongly one other label dominates. Duplicates: same content hash (exact) or cosine
    similarity >= ``near`` (near), with different labels.
    """
    ids = gallery.records.labelled_ids()
    if len(ids) < 2:
        raise EmptyGalleryError(f"an audit needs at least 2 labelled items, the index has {len(ids)}")
    records = list(gallery.records.take(ids))
    sub = GalleryIndex(gallery.dim, gallery.manifest, gallery.config)
    sub.add(gallery.vectors[ids], records)
    k = max(1, min(k, len(ids) - 1))
    scores, neighbours = sub.search(sub.vectors, k + 1)

    disagreements = _disagreements(ids, records, neighbours, k, max_agree)
    duplicates = _duplicates(records, neighbours, scores, near)
    return AuditReport(disagreements, sorted(duplicates.values(), key=lambda d: (d.kind, d.path_a)), len(ids), k)


def _disagreements(
    ids: np.ndarray, records: list[ItemRecord], neighbours: np.ndarray, k: int, max_agree: float
) -> list[Disagreement]:
    """Items with at most ``max_agree`` of their ``k`` neighbours sharing their label, most dominated first."""
    disagreements = []
    for i, (row, record) in enumerate(zip(neighbours, records, strict=True)):
        others = [int(j) for j in row if j != i and j >= 0][:k]
        labels = Counter(records[j].label for j in others)
        agree = labels.get(record.label, 0) / len(others)
        if agree <= max_agree:
            majority, count = labels.most_common(1)[0]
            disagreements.append(
                Disagreement(int(ids[i]), record.path, str(record.label), agree, str(majority), count / len(others))
            )
    disagreements.sort(key=lambda d: (-d.majority_share, d.agree, d.path))
    return disagreements


def _duplicates(
    records: list[ItemRecord], neighbours: np.ndarray, scores: np.ndarray, near: float
) -> dict[tuple[str, str], DuplicatePair]:
    """Differently labelled pairs with the same content hash (exact) or a similarity >= ``near`` (near)."""
    duplicates: dict[tuple[str, str], DuplicatePair] = {}
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        if record.content_hash and record.crop_index == 0:
            by_hash[record.content_hash].append(i)
    for group in by_hash.values():
        for a_pos, a in enumerate(group):
            for b in group[a_pos + 1 :]:
                _add_pair(duplicates, records[a], records[b], "exact", 1.0)
    for i, (row, sims) in enumerate(zip(neighbours, scores, strict=True)):
        for j, sim in zip(row, sims, strict=True):
            if j >= 0 and j != i and sim >= near:
                _add_pair(duplicates, records[i], records[int(j)], "near", float(sim))
    return duplicates


def _add_pair(found: dict[tuple[str, str], DuplicatePair], a: ItemRecord, b: ItemRecord, kind: str, sim: float) -> None:
    if a.label == b.label or a.path == b.path:
        return
    (a, b) = sorted((a, b), key=lambda r: r.path)
    key = (a.path, b.path)
    if key not in found or found[key].kind == "near" and kind == "exact":
        found[key] = DuplicatePair(a.path, str(a.label), b.path, str(b.label), kind, round(sim, 5))
