"""decode(): any user image (format, mode, EXIF orientation) -> uint8 RGB square, or UnreadableImage."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sstl.images import UnreadableImage, decode

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def check(arr: np.ndarray, size: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (size, size, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP"])
@pytest.mark.parametrize("size", [8, 24])
def test_formats_decode_to_rgb_square(fmt: str, size: int) -> None:
    im = Image.new("RGB", (30, 18), (200, 40, 40))
    out = decode(encode(im, fmt), size)
    check(out, size)
    # a flat colour survives every codec roughly unchanged
    assert np.abs(out.astype(int) - [200, 40, 40]).max() <= 12


def test_lossless_content_is_preserved() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(arr), "PNG"), 16)
    np.testing.assert_array_equal(out, arr)


def test_grayscale() -> None:
    im = Image.new("L", (20, 20), 77)
    out = decode(encode(im, "PNG"), 10)
    check(out, 10)
    assert (out == 77).all()


def test_grayscale_jpeg() -> None:
    im = Image.new("L", (20, 20), 150)
    out = decode(encode(im, "JPEG"), 10)
    check(out, 10)
    assert np.abs(out.astype(int) - 150).max() <= 3


def test_palette_with_transparency() -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    im.paste(1, (8, 0, 16, 16))  # right half is palette index 1 (green)
    data = encode(im, "PNG", transparency=0)  # index 0 (black, the left half) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode(data, 16)
    check(out, 16)
    assert (out[:, :8] == WHITE).all(), "transparent palette pixels become white"
    assert (out[:, 8:] == (10, 200, 30)).all()


def test_palette_without_transparency() -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 200, 30] + [0] * (256 * 3 - 3))
    out = decode(encode(im, "PNG"), 8)
    check(out, 8)
    assert (out == (10, 200, 30)).all()


def test_rgba_transparent_pixels_become_white() -> None:
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 0, 255, 255), (0, 8, 16, 16))  # opaque blue bottom half
    out = decode(encode(im, "PNG"), 16)
    check(out, 16)
    assert (out[:8] == WHITE).all()
    assert (out[8:] == BLUE).all()


def test_rgba_half_transparent_blends_over_white() -> None:
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    out = decode(encode(im, "PNG"), 8)
    assert np.abs(out.astype(int) - 127).max() <= 2


def test_la_mode() -> None:
    im = Image.new("LA", (8, 8), (0, 0))
    out = decode(encode(im, "PNG"), 8)
    assert (out == 255).all()


def test_16bit_grayscale_png() -> None:
    arr = np.full((12, 12), 32768, dtype=np.uint16)
    arr[:, 6:] = 65535
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data, 12)
    check(out, 12)
    assert np.abs(out[:, :5].astype(int) - 128).max() <= 2, "mid-gray 32768 maps near 128"
    assert (out[:, 7:] == 255).all()


def test_16bit_dark_png_is_not_stretched() -> None:
    # a 16-bit image whose values are all <= 255 is very dark, not mid-gray
    arr = np.full((8, 8), 200, dtype=np.uint16)
    out = decode(encode(Image.fromarray(arr), "PNG"), 8)
    assert out.max() <= 2


def test_exif_rotated_jpeg() -> None:
    # 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90 degrees clockwise
    # to display, which gives a 20 x 40 portrait image with the red half on top.
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(im, "JPEG", exif=exif, quality=95)
    raw = decode(data, 40)
    check(raw, 40)
    out = raw.astype(int)
    # centre square crop of the portrait: the top half red, the bottom half blue, for every column.
    # Without the EXIF transpose it would be the left half red instead.
    top, bottom = out[2:18], out[22:38]
    assert (top[..., 0] > 200).all() and (top[..., 2] < 60).all()
    assert (bottom[..., 2] > 200).all() and (bottom[..., 0] < 60).all()


def test_exif_orientation_8_is_the_other_way() -> None:
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: red ends at the bottom
    out = decode(encode(im, "JPEG", exif=exif, quality=95), 40).astype(int)
    assert (out[22:38, :, 0] > 200).all()
    assert (out[2:18, :, 2] > 200).all()


def test_centre_crop_of_wide_image() -> None:
    # 30 x 10: left third red, middle blue, right third red; the centre square is the blue third
    im = Image.new("RGB", (30, 10), RED)
    im.paste(BLUE, (10, 0, 20, 10))
    out = decode(encode(im, "PNG"), 10)
    assert (out == BLUE).all()


def test_upscales_small_image() -> None:
    out = decode(encode(Image.new("RGB", (3, 5), (1, 2, 3)), "PNG"), 32)
    check(out, 32)
    assert (out == (1, 2, 3)).all()


def test_large_jpeg_uses_draft_but_keeps_size() -> None:
    im = Image.new("RGB", (800, 400), BLUE)
    im.paste(RED, (0, 0, 400, 400))
    raw = decode(encode(im, "JPEG", quality=90), 16)
    check(raw, 16)
    out = raw.astype(int)
    assert (out[:, :6, 0] > 200).all() and (out[:, 10:, 2] > 200).all()


def test_empty_bytes_unreadable() -> None:
    with pytest.raises(UnreadableImage, match="empty"):
        decode(b"", 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_garbage_bytes_unreadable(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(UnreadableImage):
        decode(data, 8)


def test_text_file_unreadable() -> None:
    with pytest.raises(UnreadableImage):
        decode(b"hello, this is not an image\n", 8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_image_unreadable(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), fmt)
    with pytest.raises(UnreadableImage):
        decode(data[: len(data) // 2], 8)


def test_unreadable_message_is_one_line() -> None:
    with pytest.raises(UnreadableImage) as info:
        decode(b"\xff\xd8\xff\xe0garbage", 8)
    assert str(info.value)
    assert "\n" not in str(info.value)
