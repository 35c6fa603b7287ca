"""Augmentation: the batched part (flip, translation, cutout) is exact, seeded and device-independent;
the per-image albumentations part is built only for the layers that need it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import sstl.data.transforms as transforms
from sstl.config.train import AIRBENCH, AugmentConfig
from sstl.data.transforms import augment_batch, augmenter, hole_sides, strong_augment

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
BATCHED = AugmentConfig(**{**OFF, "hflip": True, "translate": 0.0625, "erase": 0.5})  # the CIFAR-10 student's
PER_IMAGE = {"crop_scale": 0.5, "rotate": 30.0, "color": 0.5, "blur_noise": 1.0}
ON = {"hflip": True, "translate": 0.2, "erase": 1.0, **PER_IMAGE}


def random_images(n: int, size: int = SIZE, seed: int = 0, low: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(low, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return random_images(6)


def windows(image: np.ndarray, t: int) -> dict[tuple[int, int, int], np.ndarray]:
    """Every (flip, dy, dx) -> H x W window of the (flipped) image reflect-padded by t: the reference."""
    h, w, _ = image.shape
    out = {}
    for flip in (0, 1):
        padded = np.pad(image[:, ::-1] if flip else image, ((t, t), (t, t), (0, 0)), mode="reflect")
        for dy in range(-t, t + 1):
            for dx in range(-t, t + 1):
                out[flip, dy, dx] = padded[t + dy : t + dy + h, t + dx : t + dx + w]
    return out


def test_output_dtype_shape_and_device(batch: torch.Tensor) -> None:
    out = augmenter(AugmentConfig(), SIZE, seed=0)(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device == batch.device
    assert not torch.equal(out, batch), "the default config changes images"


def test_default_config_splits_into_both_parts() -> None:
    aug = augmenter(AugmentConfig(), SIZE, seed=0)
    assert aug.albumentations is not None
    names = [type(t).__name__ for t in aug.albumentations.transforms]
    assert names == ["RandomResizedCrop", "Affine", "ColorJitter", "OneOf"], names
    assert aug.albumentations.transforms[1].translate_px == {"x": (0, 0), "y": (0, 0)}, "translation is batched now"


def test_same_seed_same_output_and_different_seed_different(batch: torch.Tensor) -> None:
    cfg = AugmentConfig(**ON)
    a, b, c = (augmenter(cfg, SIZE, seed=s) for s in (3, 3, 4))
    first = a(batch)
    assert torch.equal(first, b(batch))
    assert not torch.equal(first, c(batch))
    assert not torch.equal(first, a(batch)), "the next batch draws new parameters"


def test_all_layers_off_is_identity(batch: torch.Tensor) -> None:
    aug = augmenter(AugmentConfig(**OFF), SIZE, seed=0)
    assert aug.albumentations is None and aug.identity
    state = aug.get_state()
    assert aug(batch) is batch
    assert torch.equal(aug.get_state()["batched"], state["batched"]), "nothing drawn"


def test_light_config_builds_no_albumentations(monkeypatch: pytest.MonkeyPatch, batch: torch.Tensor) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an albumentations Compose was built for a batched-only config")

    monkeypatch.setattr(transforms.A, "Compose", refuse)
    monkeypatch.setattr(transforms, "augment_batch", refuse)  # the per-image loop
    for cfg in (AIRBENCH, BATCHED):
        aug = augmenter(cfg, SIZE, seed=0)
        assert aug.albumentations is None and not cfg.per_image
        out = aug(batch)
        assert out.shape == batch.shape and not torch.equal(out, batch)


@pytest.mark.parametrize(("key", "value"), list(PER_IMAGE.items()))
def test_each_per_image_layer_alone(batch: torch.Tensor, key: str, value: object) -> None:
    aug = augmenter(AugmentConfig(**{**OFF, key: value}), SIZE, seed=1)
    assert aug.albumentations is not None and len(aug.albumentations.transforms) == 1
    out = aug(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not torch.equal(out, batch)


@pytest.mark.parametrize(("key", "value"), [("hflip", True), ("translate", 0.2), ("erase", 1.0)])
def test_each_batched_layer_alone(batch: torch.Tensor, key: str, value: object) -> None:
    aug = augmenter(AugmentConfig(**{**OFF, key: value}), SIZE, seed=1)
    assert aug.albumentations is None
    out = aug(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not torch.equal(out, batch)


def test_crop_keeps_size_for_other_inputs() -> None:
    images = torch.zeros((2, 40, 40, 3), dtype=torch.uint8)
    out = augmenter(AugmentConfig(**{**OFF, "crop_scale": 0.5, "translate": 0.1, "erase": 1.0}), 40, seed=0)(images)
    assert out.shape == (2, 40, 40, 3)


def test_flip_and_translation_are_windows_of_the_reflect_padded_image() -> None:
    """Each output is exactly one (flip, dy, dx) window, |d| <= round(translate * side); all of them occur."""
    images = random_images(400, size=32, seed=1)
    t = round(0.1 * 32)
    out = augmenter(AugmentConfig(**{**OFF, "hflip": True, "translate": 0.1}), 32, seed=0)(images).numpy()
    seen = set()
    for image, o in zip(images.numpy(), out, strict=True):
        found = [key for key, window in windows(image, t).items() if np.array_equal(window, o)]
        assert len(found) == 1, f"not one flip/translation window of the reflect-padded image: {found}"
        seen.add(found[0])
    assert len(seen) == 2 * (2 * t + 1) ** 2, f"only {len(seen)} of the {2 * (2 * t + 1) ** 2} windows occur"
    flips = sum(key[0] for key in seen)
    assert flips == len(seen) // 2


def test_flip_probability_is_one_half() -> None:
    images = random_images(2000, size=8, seed=2)
    out = augmenter(AugmentConfig(**{**OFF, "hflip": True}), 8, seed=0)(images)
    flipped = (out == images.flip(2)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped ^ kept).all()), "each image is flipped or kept, nothing else"
    assert abs(flipped.float().mean().item() - 0.5) < 0.05  # 2000 draws: 4.5 standard deviations


def _holes(out: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Per image (no zero pixel in the input), the bounding box (top, left, height, width) of its zeros."""
    boxes: list[tuple[int, int, int, int] | None] = []
    for o in out:
        zero = (o == 0).all(-1)
        assert ((o == 0).any(-1) == zero).all(), "a hole zeroes all three channels"
        if not zero.any():
            boxes.append(None)
            continue
        ys, xs = np.nonzero(zero)
        top, left, height, width = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert zero.sum() == height * width, "the zeros form one rectangle"
        boxes.append((int(top), int(left), int(height), int(width)))
    return boxes


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_cutout_zeroes_one_square_with_probability_erase(p: float) -> None:
    size, n = 32, 2000
    images = random_images(n, size=size, seed=3, low=1)  # no zero pixels: every zero is the hole
    out = augmenter(AugmentConfig(**{**OFF, "erase": p}), size, seed=0)(images).numpy()
    boxes = _holes(out)
    lo, hi = hole_sides(size, size)
    assert (lo, hi) == (6, 13)  # 0.2 and 0.4 of 32, rounded
    sides = []
    for image, o, box in zip(images.numpy(), out, boxes, strict=True):
        if box is None:
            assert np.array_equal(image, o)
            continue
        top, left, height, width = box
        assert np.array_equal(np.where((o == 0), 0, image), o), "only the hole changes"
        assert 1 <= height <= hi and 1 <= width <= hi
        inside = top > 0 and top + height < size and left > 0 and left + width < size
        if inside:  # not clipped by a border: a whole square
            assert height == width and lo <= height <= hi, box
            sides.append(height)
    rate = sum(b is not None for b in boxes) / n
    assert abs(rate - p) < 0.04, f"holes in {rate:.3f} of the images, erase={p}"
    if p == 1.0:
        assert set(sides) == set(range(lo, hi + 1)), f"hole sides drawn: {sorted(set(sides))}"
        clipped = sum(b is not None and not (b[2] == b[3] and lo <= b[2]) for b in boxes)
        assert clipped > 0, "holes at the border are clipped, not moved inside"


def test_cutout_after_translation_keeps_the_window_elsewhere() -> None:
    size, t = 32, 2
    images = random_images(200, size=size, seed=4, low=1)
    out = augmenter(BATCHED, size, seed=5)(images).numpy()
    boxes = _holes(out)
    assert 0.4 < sum(b is not None for b in boxes) / len(boxes) < 0.6
    for image, o in zip(images.numpy(), out, strict=True):
        kept = (o != 0).all(-1)
        matches = [k for k, win in windows(image, t).items() if np.array_equal(win[kept], o[kept])]
        assert matches, "outside the hole the image is a flip/translation window"


def test_state_replays_the_next_batch_also_after_weights_only_load(batch: torch.Tensor) -> None:
    cfg = AugmentConfig(**ON)  # both parts: the torch generator and albumentations' own generators
    aug = augmenter(cfg, SIZE, seed=7)
    aug(batch)
    buffer = io.BytesIO()
    torch.save(aug.get_state(), buffer)
    expected = [aug(batch), aug(batch)]
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = augmenter(cfg, SIZE, seed=7)  # a resumed process builds its own, then restores the streams
    assert not torch.equal(fresh(batch), expected[0])
    fresh.set_state(state)
    assert torch.equal(fresh(batch), expected[0])
    assert torch.equal(fresh(batch), expected[1])
    aug.set_state(state)  # and the same object rewinds
    assert torch.equal(aug(batch), expected[0])


def test_describe_is_stable_and_names_config_and_rng_position(batch: torch.Tensor) -> None:
    cfg = AugmentConfig(**ON)
    a, b = augmenter(cfg, SIZE, seed=1), augmenter(cfg, SIZE, seed=1)
    assert repr(a) == repr(b) and a.describe() == b.describe()
    assert "0x" not in repr(a), "no object addresses"
    assert a.describe() != augmenter(cfg, SIZE, seed=2).describe()
    assert a.describe() != augmenter(AugmentConfig(**{**ON, "erase": 0.5}), SIZE, seed=1).describe()
    assert a.describe() != augmenter(AIRBENCH, SIZE, seed=1).describe()
    a(batch)
    assert repr(a) == repr(b) and a.describe() != b.describe(), "describe follows the RNG position"


def test_own_stream_not_the_shuffling_generator() -> None:
    """`fit` shuffles with torch.Generator().manual_seed(seed): the augmentation must not draw the same numbers."""
    aug = augmenter(AugmentConfig(**{**OFF, "hflip": True}), SIZE, seed=0)
    shuffle = torch.Generator().manual_seed(0)
    assert not torch.equal(aug.generator.get_state(), shuffle.get_state())


def test_strong_augment_is_the_per_image_part_only() -> None:
    assert strong_augment(AugmentConfig(**{**OFF, "hflip": True, "translate": 0.2, "erase": 1.0}), SIZE, 0) is None
    images = random_images(2)
    assert augment_batch(images, None) is images


@pytest.mark.parametrize("cfg", [BATCHED, AugmentConfig(**ON)], ids=["batched", "both"])
def test_same_bytes_on_cuda_as_on_cpu(cfg: AugmentConfig) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CPU/GPU equality of the batched part is checked on a GPU machine")
    images = random_images(64, size=32, seed=6)
    on_cpu = augmenter(cfg, 32, seed=0)(images)
    on_gpu = augmenter(cfg, 32, seed=0)(images.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_batched_part_on_a_non_contiguous_view_matches_a_contiguous_copy() -> None:
    images = random_images(16, size=32, seed=8)
    view = images.flip(0)[::2]  # what a training loop may pass: rows picked out of a larger tensor
    a = augmenter(BATCHED, 32, seed=0).batched(view)
    b = augmenter(BATCHED, 32, seed=0).batched(view.contiguous())
    assert torch.equal(a, b)
