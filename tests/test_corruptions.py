"""test-add corruptions: shapes, determinism, and that each kind really degrades the image."""

from __future__ import annotations

import numpy as np
import pytest

from sstl.config.data import CorruptConfig
from sstl.data.corruptions import LEVELS, corrupt, corrupt_one


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = np.zeros((32, 32, 3), np.uint8)
    base[8:24, 8:24] = 220  # a bright square: edges to blur, contrast to reduce
    return [np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8) for _ in range(12)]


@pytest.mark.parametrize("kind", sorted(LEVELS))
def test_each_kind_changes_the_image_and_keeps_shape(images: list[np.ndarray], kind: str) -> None:
    out = corrupt_one(images[0], kind, 5, np.random.default_rng(1))
    assert out.shape == images[0].shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - images[0]).mean() > 1.0


def test_contrast_and_blur_reduce_spread(images: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    assert corrupt_one(images[0], "contrast", 3, rng).std() < images[0].std() * 0.6
    assert corrupt_one(images[0], "gaussian_blur", 5, rng).std() < images[0].std()


def test_corrupt_is_seeded_and_uses_every_kind(images: list[np.ndarray]) -> None:
    cfg = CorruptConfig(severity=3, seed=7)
    a, kinds_a = corrupt(images, cfg)
    b, kinds_b = corrupt(images, cfg)
    assert kinds_a == kinds_b and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(kinds_a) == set(cfg.kinds)
    c, kinds_c = corrupt(images, CorruptConfig(severity=3, seed=8))
    assert kinds_c != kinds_a or not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
