"""Decode any user image (JPEG, PNG, BMP, WebP; any size and mode) into a uint8 RGB square."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


class UnreadableImage(Exception):
    """The file cannot be used as an image; `str(err)` is the reason for the skip report."""


RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def decode(data: bytes, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """File bytes -> uint8 (size, size, 3): EXIF-rotated, converted to RGB, centre-cropped square,
    resized with the backbone's `interpolation` (bicubic, bilinear, nearest, lanczos)."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # let libjpeg decode at reduced scale: far faster
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"not a readable image ({type(err).__name__}: {err})") from None
    fitted = ImageOps.fit(rgb, (size, size), method=RESAMPLING[interpolation])
    return np.asarray(fitted, dtype=np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, CMYK and 16/32-bit modes -> 8-bit RGB (alpha over white)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F":  # float images carry no fixed range: stretch to their maximum
            top = max(float(arr.max()), 1e-12)
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
