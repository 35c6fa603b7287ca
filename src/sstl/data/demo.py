"""The embedded demo dataset: scikit-learn's handwritten digits (real 8x8 scans, no download).

Written out as PNG files in the user's folder layout, so the demo goes through the same ingestion
as a user's own photos. `test-add` is a held-out set disjoint from `test`, shifted by one pixel and
given sensor noise: the same digits as scanned by a noisier, slightly misregistered device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from sstl.core.files import atomic_path

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def shift_and_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (8, 8) -> uint8 (8, 8): roll by up to 1 pixel each axis, add Gaussian noise (sigma 24/255)."""
    dy, dx = rng.integers(-1, 2, size=2)
    moved = np.roll(img, (int(dy), int(dx)), axis=(0, 1)).astype(np.float64)
    return np.clip(moved + rng.normal(0.0, 24.0, size=img.shape), 0, 255).astype(np.uint8)


def write_demo(
    out: Path, labels_per_class: int, test_fraction: float, test_add_fraction: float, seed: int
) -> dict[str, int]:
    """Split the 1,797 digits per class into labeled / unlabeled / test / test-add PNG folders."""
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 ink levels -> 0..255
    rng = np.random.default_rng(seed)
    counts = {"labeled": 0, "unlabeled": 0, "test": 0, "test-add": 0}
    for c, name in enumerate(CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = round(len(idx) * test_fraction)
        n_add = round(len(idx) * test_add_fraction)
        parts = {
            "test": idx[:n_test],
            "test-add": idx[n_test : n_test + n_add],
            "labeled": idx[n_test + n_add : n_test + n_add + labels_per_class],
            "unlabeled": idx[n_test + n_add + labels_per_class :],
        }
        for split, members in parts.items():
            for i in members:
                img = shift_and_noise(images[i], rng) if split == "test-add" else images[i]
                # unlabeled images carry no class folder; group them in sub-folders (any nesting works)
                sub = f"batch{i % 4}" if split == "unlabeled" else name
                _write_png(Path(out) / split / sub / f"{i:04d}.png", img)
            counts[split] += len(members)
    return counts


def _write_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img, mode="L").save(tmp, format="PNG")
