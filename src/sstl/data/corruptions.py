"""Common image corruptions for a `test-add` set (in the spirit of CIFAR-10-C, Hendrycks & Dietterich 2019).

Each test image gets one corruption, chosen by a seeded generator, at a fixed severity (1..5);
the levels follow CIFAR-10-C's for 32 px images. Works on packed uint8 (H, W, 3) arrays.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from sstl.config.data import CorruptConfig

# severity 1..5 -> strength; noise: std as a fraction of 255; blur: sigma in pixels at 32 px
# (scaled with the image side); jpeg: quality; contrast: factor towards the mean
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "jpeg": (80, 65, 58, 50, 40),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
}


def corrupt_one(img: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    level = LEVELS[kind][severity - 1]
    if kind == "gaussian_noise":
        noisy = img / 255.0 + rng.normal(0.0, level, size=img.shape)
        return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)
    if kind == "contrast":
        mean = img.mean(axis=(0, 1), keepdims=True)
        return np.clip((img - mean) * level + mean, 0, 255).round().astype(np.uint8)
    pil = Image.fromarray(img)
    if kind == "gaussian_blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(level * img.shape[0] / 32)), dtype=np.uint8)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(level))
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def corrupt(images: list[np.ndarray], cfg: CorruptConfig) -> tuple[list[np.ndarray], list[str]]:
    """Each image under one seeded-random corruption of `cfg.kinds`; returns (images, kinds used)."""
    rng = np.random.default_rng(cfg.seed)
    kinds = [cfg.kinds[i] for i in rng.integers(0, len(cfg.kinds), size=len(images))]
    return [corrupt_one(img, k, cfg.severity, rng) for img, k in zip(images, kinds, strict=True)], kinds
