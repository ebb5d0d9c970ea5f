"""The carsearch error family: every error a user can fix says what was expected and how to fix it."""

from __future__ import annotations

from typing import Literal


class CarSearchError(Exception):
    """Base class of all carsearch errors."""


class ConfigError(CarSearchError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class ModelLoadError(CarSearchError, RuntimeError):
    """Weights or a checkpoint could not be loaded, or do not match what was asked for."""


class IndexMismatchError(CarSearchError, ValueError):
    """An index was opened or extended with an incompatible embedder, dimension or preprocessing."""


class IndexBusyError(CarSearchError, RuntimeError):
    """An index folder is being written by another job: one writer at a time (``carsearch.data.lock``)."""


class EmptyGalleryError(CarSearchError, ValueError):
    """A search or evaluation was asked of an index that holds no items."""


ImageProblem = Literal["too_large", "not_image", "too_small", "unreadable"]


class ImageLoadError(CarSearchError, ValueError):
    """An input file is not a usable image. ``kind`` says why, for callers that answer by it (the HTTP API):
    ``too_large`` (over the pixel limit), ``not_image`` (no known format), ``too_small`` (a side under the
    minimum) or ``unreadable`` (empty, corrupt, truncated, unreadable, or not a picture at all)."""

    def __init__(self, message: str, kind: ImageProblem = "unreadable") -> None:
        super().__init__(message)
        self.kind: ImageProblem = kind

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[str, ImageProblem]]:
        """Pickled with its kind (decode workers and Ray tasks send errors across processes)."""
        return type(self), (str(self), self.kind)


class DataSourceError(CarSearchError, ValueError):
    """A dataset source (folder, CSV, devkit) is missing or malformed."""


class ExplainError(CarSearchError, ValueError):
    """A CAM cannot be computed as asked (unknown method, no usable target layer)."""
