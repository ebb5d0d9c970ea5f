"""Stage 3: the faiss gallery index with its records and manifest."""

from carsearch.index.gallery import GalleryIndex, check_identity, read_manifest
from carsearch.index.records import ItemRecord

__all__ = ["GalleryIndex", "ItemRecord", "check_identity", "read_manifest"]
