"""Map a CAM from the model's input back onto the image (and the photo) it came from."""

from __future__ import annotations

import numpy as np
from PIL import Image

from carsearch.embedder.preprocessing import Preprocessing
from carsearch.types import BBox


def _resize(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )


def cam_to_image(cam: np.ndarray, width: int, height: int, preprocessing: Preprocessing) -> np.ndarray:
    """CAM of a preprocessed image (the model input's shape) → (height, width) map over the image's pixels.

    ``squash`` stretched the whole image into the input (square or not), so the map is stretched back. ``center_crop``
    saw only the centre: that part is mapped back and the unseen border is 0.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if preprocessing.resize == "squash":
        return _resize(cam, width, height)
    scale = preprocessing.image_size / min(width, height)  # resize shorter side to S, then crop S x S
    seen_w, seen_h = (
        min(width, round(preprocessing.image_size / scale)),
        min(height, round(preprocessing.image_size / scale)),
    )
    out = np.zeros((height, width), dtype=np.float32)
    left, top = (width - seen_w) // 2, (height - seen_h) // 2
    out[top : top + seen_h, left : left + seen_w] = _resize(cam, seen_w, seen_h)
    return out


def paste_into(cam: np.ndarray, region: BBox | None, width: int, height: int) -> np.ndarray:
    """A crop's (h, w) map placed at ``region`` in a (height, width) zero map of the full photo."""
    if region is None:
        return cam if cam.shape == (height, width) else _resize(cam, width, height)
    x1, y1, x2, y2 = region.clip(width, height).to_int()
    x2, y2 = min(x2, width), min(y2, height)
    out = np.zeros((height, width), dtype=np.float32)
    if x2 > x1 and y2 > y1:
        out[y1:y2, x1:x2] = cam if cam.shape == (y2 - y1, x2 - x1) else _resize(cam, x2 - x1, y2 - y1)
    return out
