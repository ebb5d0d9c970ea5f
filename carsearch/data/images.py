"""Safe image decoding: any file in, an RGB ``PIL.Image`` out, or a clear :class:`ImageLoadError`."""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carsearch.data import storage
from carsearch.errors import ImageLoadError

MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 100_000_000  # 100 MP: larger files are refused as decompression bombs


def content_hash(data: bytes) -> str:
    """Hex digest identifying file content (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _pil_open(fp: io.BytesIO) -> Image.Image:
    """``PIL.Image.open``, bypassing ultralytics' patch of it (which pip-installs pi-heif on unknown files)."""
    opener = Image.open
    module = sys.modules.get(getattr(opener, "__module__", "") or "")
    original = getattr(module, "_image_open", None) if opener.__module__.startswith("ultralytics") else None
    return (original or opener)(fp)


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Decode bytes to an 8-bit RGB image with EXIF orientation applied.

    Grayscale, palette, CMYK, alpha (composited on white) and 16-bit inputs are converted.
    Raises :class:`ImageLoadError` for empty, corrupt, non-image, too small or too large input.
    """
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the guard; PIL's warning threshold (89 MP) would contradict it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _pil_open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"image too large: {width}x{height} = {width * height} pixels > {max_pixels} "
                    "(decompression-bomb guard)",
                    "too_large",
                )
            image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large (decompression-bomb guard): {exc}", "too_large") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image file (format not recognised)", "not_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"corrupt or truncated image: {exc}") from None
    return prepare(image, max_pixels, min_side)


def prepare(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """A decoded image as every stage takes it: size-checked, EXIF orientation applied, 8-bit RGB."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}", "too_large")
    if min(image.size) < min_side:
        raise ImageLoadError(f"image too small: {width}x{height} (need >= {min_side} px a side)", "too_small")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the image
        pass
    return to_rgb(image)


ImageInput = str | Path | bytes | Image.Image | np.ndarray
ARRAY_MODES = {2: "L", 3: "RGB", 4: "RGBA"}  # channels (a 2-D array: 2) -> PIL mode


def as_image(picture: ImageInput) -> tuple[Image.Image, bytes | None]:
    """Any picture a caller holds, as an RGB image prepared exactly as the same picture read from a file
    (:func:`decode_image`), and its encoded bytes when it came as a file, a URI or bytes (else None).

    ``picture``: a path or URI, encoded bytes, a ``PIL.Image`` in any mode, or a uint8 array (H, W, 3) RGB,
    (H, W, 4) RGBA or (H, W) grayscale. Raises :class:`ImageLoadError` for anything else.
    """
    if isinstance(picture, (bytes, bytearray, memoryview)):
        data = bytes(picture)
        return decode_image(data), data
    if isinstance(picture, (str, Path)):
        data = read_image_bytes(picture)
        return decode_image(data), data
    if isinstance(picture, np.ndarray):
        return prepare(array_image(picture)), None
    if isinstance(picture, Image.Image):
        width, height = picture.size
        if width * height > MAX_IMAGE_PIXELS:  # before load(): a lazily opened bomb is never decoded
            raise ImageLoadError(
                f"image too large: {width}x{height} = {width * height} pixels > {MAX_IMAGE_PIXELS}", "too_large"
            )
        try:
            picture.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot read the PIL image: {exc}") from None
        return prepare(picture), None
    raise ImageLoadError(f"expected a path, a URI, bytes, a PIL image or a uint8 array, got {type(picture).__name__}")


def array_image(array: np.ndarray) -> Image.Image:
    """A uint8 array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale as a PIL image (never BGR-guessed)."""
    channels = 2 if array.ndim == 2 else (array.shape[2] if array.ndim == 3 else 0)
    if array.dtype != np.uint8 or channels not in ARRAY_MODES:
        raise ImageLoadError(
            f"expected a uint8 array of shape (H, W, 3) RGB, (H, W, 4) RGBA or (H, W), got {array.dtype} {array.shape}"
        )
    return Image.fromarray(np.ascontiguousarray(array))  # PIL infers L / RGB / RGBA from uint8 shapes


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha is composited on white, 16-bit is rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        gray = ((array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image_bytes(path: str | Path) -> bytes:
    """An image file's bytes (:func:`~carsearch.data.storage.read_bytes`), or :class:`ImageLoadError` saying
    why they cannot be read: the one place a failed read of an image becomes ``ImageLoadError``."""
    try:
        return storage.read_bytes(path)
    except IsADirectoryError:
        raise ImageLoadError(f"{path} is a directory, not an image") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read {path}: {storage.read_failure(exc)}") from None


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`)."""
    return decode_image(read_image_bytes(path), max_pixels=max_pixels)


def limit_size(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Downscale so the longer side is at most ``max_side``; returns the image and the scale applied."""
    longest = max(image.size)
    if longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale
