"""Strong augmentation (seeded, layered) and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sstl.transforms import AugmentConfig, augment_batch, strong_augment

SIZE = 24
OFF = {
    "hflip": False,
    "crop_scale": 1.0,
    "rotate": 0.0,
    "translate": 0.0,
    "color": 0.0,
    "blur_noise": 0.0,
    "erase": 0.0,
}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8))


def test_output_dtype_and_shape(batch: torch.Tensor) -> None:
    out = augment_batch(batch, strong_augment(AugmentConfig(), SIZE, seed=0))
    assert out.dtype == torch.uint8
    assert out.shape == batch.shape
    assert not torch.equal(out, batch), "the default config changes images"


def test_same_seed_same_output(batch: torch.Tensor) -> None:
    a = augment_batch(batch, strong_augment(AugmentConfig(), SIZE, seed=3))
    b = augment_batch(batch, strong_augment(AugmentConfig(), SIZE, seed=3))
    assert torch.equal(a, b)


def test_different_seed_different_output(batch: torch.Tensor) -> None:
    a = augment_batch(batch, strong_augment(AugmentConfig(), SIZE, seed=3))
    b = augment_batch(batch, strong_augment(AugmentConfig(), SIZE, seed=4))
    assert not torch.equal(a, b)


def test_all_layers_off_is_identity(batch: torch.Tensor) -> None:
    transform = strong_augment(AugmentConfig(**OFF), SIZE, seed=0)
    assert len(transform.transforms) == 0
    assert torch.equal(augment_batch(batch, transform), batch)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hflip", True),
        ("crop_scale", 0.5),
        ("rotate", 30.0),
        ("translate", 0.2),
        ("color", 0.5),
        ("blur_noise", 1.0),
        ("erase", 1.0),
    ],
)
def test_each_layer_alone_changes_images(batch: torch.Tensor, key: str, value: object) -> None:
    transform = strong_augment(AugmentConfig(**{**OFF, key: value}), SIZE, seed=1)
    assert len(transform.transforms) == 1
    out = augment_batch(batch, transform)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not torch.equal(out, batch)


def test_crop_keeps_size_for_other_inputs() -> None:
    images = torch.zeros((2, 40, 40, 3), dtype=torch.uint8)
    out = augment_batch(images, strong_augment(AugmentConfig(**{**OFF, "crop_scale": 0.5}), 40, seed=0))
    assert out.shape == (2, 40, 40, 3)


def test_translate_shifts_both_ways() -> None:
    """`translate` is the max shift: shifts must go left and right, up and down, by various amounts."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[14:18, 14:18] = 255  # a white square at the centre
    images = torch.from_numpy(np.stack([img] * 40))
    out = augment_batch(images, strong_augment(AugmentConfig(**{**OFF, "translate": 0.2}), 32, seed=0)).numpy()
    dx, dy = [], []
    for o in out:
        ys, xs = np.nonzero(o[..., 0] > 127)
        if len(xs):
            dx.append(xs.mean() - 15.5)
            dy.append(ys.mean() - 15.5)
    assert max(np.abs(dx)) <= 0.2 * 32 + 1 and max(np.abs(dy)) <= 0.2 * 32 + 1
    assert min(dx) < -0.5 < 0.5 < max(dx), f"horizontal shifts only one way: {sorted({float(v) for v in dx})}"
    assert min(dy) < -0.5 < 0.5 < max(dy), f"vertical shifts only one way: {sorted({float(v) for v in dy})}"
