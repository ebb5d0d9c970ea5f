"""Stage 3: the faiss gallery index with its records and manifest (:class:`Manifest`).

The names below load on first use (PEP 562), so a process that needs only the records (a Ray decode task
unpickling :class:`~carsearch.index.records.ItemRecord`) does not import faiss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from carsearch.lazy import lazy_attributes

if TYPE_CHECKING:
    from carsearch.index.gallery import GalleryIndex
    from carsearch.index.manifest import Manifest, check_identity, read_manifest
    from carsearch.index.records import ItemRecord

__all__ = ["GalleryIndex", "ItemRecord", "Manifest", "check_identity", "read_manifest"]
_HOMES = {
    "GalleryIndex": "carsearch.index.gallery",
    "ItemRecord": "carsearch.index.records",
    "Manifest": "carsearch.index.manifest",
    "check_identity": "carsearch.index.manifest",
    "read_manifest": "carsearch.index.manifest",
}

__getattr__ = lazy_attributes(__name__, _HOMES)
