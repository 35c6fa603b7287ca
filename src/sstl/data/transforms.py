"""Augmentation of uint8 (N, H, W, 3) batches, in two parts; normalising is the model's own `preprocess`,
so every network sees its backbone's mean and std.

Images arrive packed as uint8 (N, H, W, 3) at the target size (see `prepare`), so no transform
decodes or resizes a full image; augmentation works on those small arrays, in two parts:

- batched (`Augmenter.batched`): horizontal flip, translation (a random window of the reflect-padded
  image, as airbench's random crop) and cutout, for the whole batch at once with tensor ops on
  whatever device the batch is on: no Python loop over images. Its random parameters are drawn on
  the CPU from its own seeded `torch.Generator`, so a batch is augmented alike on every device.
- per image (`Augmenter.host`, albumentations on the CPU): what pays its per-image cost on photos,
  random resized crop, rotation, colour jitter, blur and noise. With all of these off no
  albumentations pipeline is built and nothing loops over images.

The per-image part runs first (on the host), then the batched part (after the batch is moved to
the device): `image_inputs` in `training` calls `host`, moves the batch, then calls `batched`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import albumentations as A
import numpy as np
import torch

from sstl.config.train import AugmentConfig

HOLE = (0.2, 0.4)  # cutout's square side, as a fraction of the image side (the shorter one)


def strong_augment(cfg: AugmentConfig, size: int, seed: int) -> A.Compose | None:
    """The per-image albumentations part: geometry (crop, rotation), then colour, then degradation;
    seeded so a run can be repeated. None when none of these layers is on (nothing to build or loop)."""
    if not cfg.per_image:
        return None
    geometry: list[A.BasicTransform] = []
    if cfg.crop_scale < 1.0:
        geometry.append(A.RandomResizedCrop(size=(size, size), scale=(cfg.crop_scale, 1.0), p=1.0))
    if cfg.rotate:
        geometry.append(A.Affine(rotate=(-cfg.rotate, cfg.rotate), p=0.7))
    colour: list[A.BasicTransform] = []
    if cfg.color:
        c = cfg.color
        colour.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c / 4, 0.5), p=0.8))
    degrade: list[A.BasicTransform] = []
    if cfg.blur_noise:
        degrade.append(
            A.OneOf(
                [A.GaussianBlur(sigma_limit=(0.1, 1.0), p=1.0), A.GaussNoise(std_range=(0.02, 0.1), p=1.0)],
                p=cfg.blur_noise,
            )
        )
    return A.Compose(geometry + colour + degrade, seed=seed)


def augment_batch(images: torch.Tensor, transform: A.Compose | None) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the CPU -> uint8 (N, H, W, 3), each image through `transform` (None: as is)."""
    if transform is None:
        return images
    out = [transform(image=img)["image"] for img in images.numpy()]
    return torch.from_numpy(np.stack(out))


def compose_nodes(augment: A.Compose | None) -> list[Any]:
    """Every Compose and transform in the tree, in a fixed order: albumentations gives each node its own
    numpy and python generators (seeded by Compose(seed=...)), independent of the global ones."""
    nodes, todo = [], [] if augment is None else [augment]
    while todo:
        node = todo.pop(0)
        nodes.append(node)
        if isinstance(node, A.BaseCompose):
            todo.extend(node.transforms)
    return nodes


def hole_sides(h: int, w: int) -> tuple[int, int]:
    """The smallest and largest side of cutout's square hole on H x W images, pixels (before clipping)."""
    short = min(h, w)
    lo = max(1, round(HOLE[0] * short))
    return lo, max(lo, round(HOLE[1] * short))


def _reflect(k: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a reflect-padded axis (no edge repeat: -1 -> 1, n -> n - 2) for -n < k < 2n - 1."""
    k = k.abs()
    return torch.where(k > n - 1, 2 * (n - 1) - k, k)


class Augmenter:
    """The augmentation a training loop applies to a uint8 (N, H, W, 3) batch: `host` (per image,
    albumentations, CPU) then `batched` (flip, translation, cutout; on the batch's device).

    Every random draw comes from the albumentations nodes' own generators and from `generator` (a
    CPU torch.Generator), so `get_state`/`set_state` replay the exact same next batches; the batched
    part gives the same bytes on any device for the same state.
    """

    def __init__(self, cfg: AugmentConfig, size: int, seed: int) -> None:
        self.cfg, self.size, self.seed = cfg, size, seed
        self.albumentations = strong_augment(cfg, size, seed)
        # a stream of its own: not the loop's shuffling generator, which `fit` seeds with the same seed
        self.generator = torch.Generator().manual_seed(_derived_seed(seed))

    @property
    def identity(self) -> bool:
        """Whether every layer is off: batches come back as they are."""
        return self.albumentations is None and not self._batched_on

    @property
    def _batched_on(self) -> bool:
        return self.cfg.hflip or self.cfg.translate > 0 or self.cfg.erase > 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the same shape, dtype and device: `host`, then `batched`."""
        if self.albumentations is not None:
            images = self.host(images.cpu()).to(images.device)
        return self.batched(images)

    def host(self, images: torch.Tensor) -> torch.Tensor:
        """The per-image albumentations part on a CPU batch; the batch itself when it has no layer."""
        return augment_batch(images, self.albumentations)

    def batched(self, images: torch.Tensor) -> torch.Tensor:
        """Flip (p=0.5), then translation by up to round(translate * side) pixels per axis (a window of
        the flipped image reflect-padded by that much), then cutout (p=erase): for all images at once,
        on their device, as one gather (erased pixels are read from a zero image appended to the batch)."""
        n, h, w, _ = images.shape
        if n == 0 or not self._batched_on:
            return images
        ty, tx = (min(round(self.cfg.translate * side), side - 1) for side in (h, w))  # reflect needs t < side
        flip, dy, dx, hole = self._draw(n, h, w, ty, tx)
        p = torch.stack([flip, dy, dx, *hole])  # drawn on the CPU, moved at once; pinned: no stream sync
        p = p.pin_memory().to(images.device, non_blocking=True) if images.is_cuda else p.to(images.device)
        flip, dy, dx, erased, side, cy, cx = p
        mask = None
        if self.cfg.erase:
            top, left = cy - side // 2, cx - side // 2  # the hole's first row and column (may be < 0)
            ys, xs = torch.arange(h, device=p.device), torch.arange(w, device=p.device)
            in_rows = (ys >= top[:, None]) & (ys < (top + side)[:, None])  # (N, H)
            in_cols = (xs >= left[:, None]) & (xs < (left + side)[:, None])  # (N, W)
            mask = in_rows[:, :, None] & in_cols[:, None, :] & (erased[:, None, None] == 1)  # (N, H, W)
        if not (self.cfg.hflip or ty or tx):
            assert mask is not None  # else nothing batched is on
            return images.masked_fill(mask[..., None], 0)
        rows = _reflect(torch.arange(h, device=p.device) + dy[:, None], h)  # (N, H)
        cols = _reflect(torch.arange(w, device=p.device) + dx[:, None], w)  # (N, W)
        cols = torch.where(flip[:, None] == 1, w - 1 - cols, cols)  # flipped first: column c is x's w - 1 - c
        batch = torch.arange(n, device=p.device)[:, None, None]  # (N, 1, 1)
        if mask is not None:
            images = torch.cat([images, images.new_zeros((1, *images.shape[1:]))])
            batch = torch.where(mask, n, batch)  # (N, H, W): erased pixels come from image n, all zeros
        return images[batch, rows[:, :, None], cols[:, None, :]]

    def _draw(
        self, n: int, h: int, w: int, ty: int, tx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The batch's random parameters, int64 (N,) each, from `generator` on the CPU: flip (0/1), shifts
        dy, dx in [-t, t], and the hole's [erased (0/1), side, centre row, centre column] (zeros when off)."""
        cfg, g = self.cfg, self.generator
        zeros = torch.zeros(n, dtype=torch.int64)
        flip = torch.randint(0, 2, (n,), generator=g) if cfg.hflip else zeros
        dy = torch.randint(-ty, ty + 1, (n,), generator=g) if ty else zeros
        dx = torch.randint(-tx, tx + 1, (n,), generator=g) if tx else zeros
        if not cfg.erase:
            return flip, dy, dx, [zeros] * 4
        lo, hi = hole_sides(h, w)
        erased = (torch.rand(n, generator=g) < cfg.erase).long()
        side = torch.randint(lo, hi + 1, (n,), generator=g)
        centre = [torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)]
        return flip, dy, dx, [erased, side, *centre]

    def get_state(self) -> dict[str, Any]:
        """Every random stream it draws from, as plain values (loadable with torch.load(weights_only=True))."""
        return {
            "batched": self.generator.get_state(),
            "albumentations": [
                (node.random_generator.bit_generator.state, node.py_random.getstate())
                for node in compose_nodes(self.albumentations)
            ],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Put back what `get_state` took: the next batches are augmented as they would have been."""
        self.generator.set_state(state["batched"])
        for node, (np_rng, py_rng) in zip(compose_nodes(self.albumentations), state["albumentations"], strict=True):
            node.random_generator.bit_generator.state = np_rng
            node.py_random.setstate(py_rng)

    def __repr__(self) -> str:
        """What it does, with its size and seed: the same for the same config (no addresses, no RNG position)."""
        t = self.cfg.translate
        batched = f"hflip={self.cfg.hflip}, translate={t} (reflect), erase={self.cfg.erase} (side {HOLE[0]}-{HOLE[1]})"
        return f"Augmenter(size={self.size}, seed={self.seed}, batched[{batched}], per_image={self.albumentations!r})"

    def describe(self) -> str:
        """`repr` plus a digest of where its random streams stand: what a run's fingerprint takes, so a
        state saved with one starting point is never resumed from another."""
        h = hashlib.sha256(self.generator.get_state().numpy().tobytes())
        h.update(repr(self.get_state()["albumentations"]).encode())
        return f"{self!r} rng {h.hexdigest()[:16]}"


def augmenter(cfg: AugmentConfig, size: int, seed: int) -> Augmenter:
    """The augmentation `cfg` asks for, on images of `size` pixels, seeded with `seed`."""
    return Augmenter(cfg, size, seed)


def _derived_seed(seed: int) -> int:
    """A 63-bit seed of its own for the batched part, from the run's seed."""
    digest = hashlib.sha256(f"sstl.transforms.batched:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
