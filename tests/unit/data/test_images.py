"""carsearch.data.images: safe decoding of any file to 8-bit RGB, or a clear ImageLoadError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from carsearch.data.images import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    content_hash,
    decode_image,
    limit_size,
    load_image,
    to_rgb,
)
from carsearch.errors import ImageLoadError
from tests.conftest import make_car_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG whose IHDR claims ``width`` × ``height``: a decompression bomb of a few bytes."""
    data = bytearray(_encode(Image.new("1", (16, 16)), "PNG"))
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return bytes(data)


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --------------------------------------------------------------------------- errors


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="empty file"):
        decode_image(b"")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image, just some text\n" * 10)
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(path)


def test_truncated_jpeg(tmp_path, car_image):
    data = _encode(car_image, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(path)


def test_truncated_png(car_image):
    data = _encode(car_image, "PNG")
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_one_pixel_image_is_too_small():
    with pytest.raises(ImageLoadError, match=r"image too small: 1x1"):
        decode_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))


def test_min_side_boundary():
    exact = decode_image(_encode(Image.new("RGB", (MIN_IMAGE_SIDE, 50)), "PNG"))
    assert exact.size == (MIN_IMAGE_SIDE, 50)
    with pytest.raises(ImageLoadError, match="too small"):
        decode_image(_encode(Image.new("RGB", (MIN_IMAGE_SIDE - 1, 50)), "PNG"))
    # min_side is a parameter
    assert decode_image(_encode(Image.new("RGB", (2, 2)), "PNG"), min_side=1).size == (2, 2)


def test_decompression_bomb_header_is_refused_before_decoding():
    data = _png_claiming_size(12000, 12000)  # 144 MP claimed, a few dozen bytes on disk
    assert len(data) < 200
    with pytest.warns(Image.DecompressionBombWarning):
        assert Image.open(io.BytesIO(data)).size == (12000, 12000)
    with pytest.raises(ImageLoadError, match="too large"):
        decode_image(data)


def test_huge_bomb_above_pil_hard_limit_is_refused():
    # 400 MP: PIL itself raises DecompressionBombError, which must come out as ImageLoadError.
    with pytest.raises(ImageLoadError, match="too large"):
        decode_image(_png_claiming_size(20000, 20000))


def test_max_pixels_parameter(tmp_path):
    data = _encode(Image.new("RGB", (100, 80), (1, 2, 3)), "PNG")
    with pytest.raises(ImageLoadError, match=r"100x80 = 8000 pixels > 5000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=8000).size == (100, 80)  # the limit itself is allowed
    path = tmp_path / "small.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path, max_pixels=7999)


def test_images_below_max_pixels_are_not_refused_as_too_large():
    width, height = 10000, 9500  # 95 MP <= MAX_IMAGE_PIXELS, but > PIL's 89.5 MP warning threshold
    assert width * height <= MAX_IMAGE_PIXELS
    data = _png_claiming_size(width, height)
    # The data is only a header, so decoding must still fail, but as corrupt, not by the size guard.
    with pytest.raises(ImageLoadError) as info:
        decode_image(data)
    assert "too large" not in str(info.value)


def test_directory_path(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match=r"cannot read .*nope\.jpg.*No such file"):
        load_image(missing)


def test_image_load_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_image(b"")


# --------------------------------------------------------------------------- mode conversion


def test_rgb_jpeg_roundtrip(tmp_path, car_image):
    path = tmp_path / "car.jpg"
    car_image.save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == car_image.size
    with Image.open(path) as reference:  # exactly what PIL decodes, no colour or geometry change
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


def test_png_is_lossless(car_image):
    image = decode_image(_encode(car_image, "PNG"))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(car_image))


def test_grayscale_l():
    gray = Image.fromarray(np.full((20, 30), 77, dtype=np.uint8), mode="L")
    image = decode_image(_encode(gray, "PNG"))
    assert image.mode == "RGB" and image.size == (30, 20)
    assert image.getpixel((3, 3)) == (77, 77, 77)


def test_palette_with_transparency_composites_on_white():
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.paste(1, (0, 0, 10, 20))  # left half index 1 (blue), right half index 0 (red)
    data = _encode(palette, "PNG", transparency=0)  # index 0 (red) is fully transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (0, 0, 255)
    assert image.getpixel((15, 5)) == (255, 255, 255)


def test_palette_without_transparency():
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    image = decode_image(_encode(palette, "PNG"))
    assert image.getpixel((4, 4)) == (10, 200, 30)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (24, 16)
    r, g, b = image.getpixel((10, 8))
    assert r > 240 and g < 15 and b < 15


def test_rgba_transparent_pixels_composite_onto_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (10, 0, 20, 10))  # fully transparent green
    rgba.paste((0, 0, 255, 128), (10, 10, 20, 20))  # half-transparent blue
    image = decode_image(_encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (255, 0, 0)
    assert image.getpixel((15, 5)) == (255, 255, 255)  # not black, not green
    r, g, b = image.getpixel((15, 15))
    assert b == 255 and abs(r - 127) <= 1 and abs(g - 127) <= 1


def test_la_composites_onto_white():
    la = Image.new("LA", (16, 16), (0, 255))
    la.paste((0, 0), (8, 0, 16, 16))  # right half: black but fully transparent
    image = decode_image(_encode(la, "PNG"))
    assert image.getpixel((2, 2)) == (0, 0, 0)
    assert image.getpixel((12, 2)) == (255, 255, 255)


def test_16_bit_png_is_scaled_to_8_bit():
    values = np.array([[0, 65535, 32768, 257]] * 8, dtype=np.uint16)
    wide = np.repeat(values, 4, axis=1)  # 8 × 16
    sixteen = Image.fromarray(wide)
    data = _encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (16, 8)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((4, 0)) == (255, 255, 255)
    assert abs(image.getpixel((8, 0))[0] - 128) <= 1
    assert image.getpixel((12, 0)) == (1, 1, 1)


def test_dark_16_bit_image_is_not_mistaken_for_8_bit():
    # every value <= 255: a 16-bit image that is nearly black must stay nearly black
    sixteen = Image.fromarray(np.full((10, 10), 200, dtype=np.uint16))
    image = decode_image(_encode(sixteen, "PNG"))
    assert image.getpixel((0, 0)) == (1, 1, 1)


def test_to_rgb_modes_directly():
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # no copy for RGB
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    as_i = Image.fromarray(np.full((4, 4), 1000, dtype=np.int32), mode="I")
    assert to_rgb(as_i).getpixel((0, 0))[0] == round(1000 / 65535 * 255)
    small_i = Image.fromarray(np.full((4, 4), 100, dtype=np.int32), mode="I")
    assert to_rgb(small_i).getpixel((0, 0)) == (100, 100, 100)
    floats = np.zeros((4, 4), dtype=np.float32)
    floats[0, 0] = 2.0
    as_f = to_rgb(Image.fromarray(floats, mode="F"))
    assert as_f.getpixel((0, 0)) == (255, 255, 255) and as_f.getpixel((1, 1)) == (0, 0, 0)
    flat_f = to_rgb(Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32), mode="F"))
    assert flat_f.getpixel((0, 0)) == (0, 0, 0)
    pa = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(pa).getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_transposes_size(orientation, car_image):
    assert car_image.size == (160, 120)
    data = _encode(car_image, "JPEG", quality=90, exif=_exif_with_orientation(orientation))
    assert Image.open(io.BytesIO(data)).size == (160, 120)
    image = decode_image(data)
    assert image.size == (120, 160)
    assert image.mode == "RGB"


def test_exif_rotation_direction():
    # left half red, right half blue; orientation 6 = rotate 90° clockwise for display → red on top
    base = Image.new("RGB", (80, 40), (255, 0, 0))
    base.paste((0, 0, 255), (40, 0, 80, 40))
    image = decode_image(_encode(base, "PNG", exif=_exif_with_orientation(6)))
    assert image.size == (40, 80)
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 75))
    assert top == (255, 0, 0) and bottom == (0, 0, 255)


def test_exif_orientation_1_keeps_size(car_image):
    data = _encode(car_image, "JPEG", exif=_exif_with_orientation(1))
    assert decode_image(data).size == (160, 120)


# --------------------------------------------------------------------------- limit_size / content_hash


@pytest.mark.parametrize(
    ("size", "max_side", "expected_size", "expected_scale"),
    [
        ((160, 120), 80, (80, 60), 0.5),
        ((120, 160), 80, (60, 80), 0.5),
        ((100, 100), 100, (100, 100), 1.0),
        ((50, 30), 100, (50, 30), 1.0),
        ((1000, 3), 100, (100, 1), 0.1),  # short side never collapses to 0
    ],
)
def test_limit_size(size, max_side, expected_size, expected_scale):
    image = Image.new("RGB", size, (9, 9, 9))
    out, scale = limit_size(image, max_side)
    assert out.size == expected_size
    assert max(out.size) <= max_side
    assert scale == pytest.approx(expected_scale)
    if expected_scale == 1.0:
        assert out is image


def test_limit_size_odd_ratio_keeps_aspect():
    image = make_car_image(3, (10, 20, 30), size=(1601, 777))
    out, scale = limit_size(image, 640)
    assert max(out.size) == 640
    assert out.size[1] == round(777 * scale)
    assert scale == pytest.approx(640 / 1601)


def test_content_hash():
    digest = content_hash(b"abc")
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert content_hash(b"abc") == digest
    assert content_hash(b"abd") != digest
    assert content_hash(b"") != digest


def test_non_image_is_refused_cleanly_after_ultralytics_patched_pil() -> None:
    # ultralytics replaces PIL.Image.open with a wrapper that pip-installs pi-heif on unknown files.
    import ultralytics  # noqa: F401
    from PIL import Image as PILImage

    from carsearch.data.images import decode_image
    from carsearch.errors import ImageLoadError

    assert PILImage.open.__module__.startswith("ultralytics")
    with pytest.raises(ImageLoadError, match="not an image"):
        decode_image(b"plain text, not pixels")


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: b"", "unreadable"),
        (lambda: b"just text, no picture", "not_image"),
        (lambda: _encoded((1, 1), "PNG"), "too_small"),
        (lambda: _encoded((64, 48), "JPEG")[:300], "unreadable"),  # truncated
    ],
    ids=["empty", "text", "one-pixel", "truncated"],
)
def test_every_refusal_says_its_kind_and_keeps_it_across_processes(make, kind: str) -> None:
    import pickle

    with pytest.raises(ImageLoadError) as caught:
        decode_image(make())
    assert caught.value.kind == kind
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), str(copy), copy.kind) == (ImageLoadError, str(caught.value), kind)


@pytest.mark.parametrize("side", [12_000, 20_000])  # our limit, PIL's own hard limit
def test_a_pixel_bomb_is_too_large(side: int) -> None:
    with pytest.raises(ImageLoadError) as caught:
        decode_image(_png_claiming_size(side, side))
    assert caught.value.kind == "too_large"
