"""Strong augmentation (albumentations, uint8 HWC) for the student; normalising is the model's own
`preprocess`, so every network sees its backbone's mean and std.

Images arrive packed as uint8 (N, H, W, 3) at the target size (see `prepare`), so no transform
decodes or resizes a full image; augmentation works on those small arrays.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Strong augmentation for the student (Noisy Student's input noise). 0 turns a layer off."""

    model_config = ConfigDict(extra="forbid")

    hflip: bool = Field(True, description="random horizontal flips (off for digits, text, ...)")
    crop_scale: float = Field(0.6, gt=0.0, le=1.0, description="min area kept by random resized crops")
    rotate: float = Field(15.0, ge=0.0, le=180.0, description="max rotation, degrees")
    translate: float = Field(0.1, ge=0.0, le=0.5, description="max shift, fraction of the side")
    color: float = Field(0.4, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter")
    blur_noise: float = Field(0.3, ge=0.0, le=1.0, description="probability of blur or noise")
    erase: float = Field(0.5, ge=0.0, le=1.0, description="probability of erasing a random patch")
    head_phase: bool = Field(
        True, description="augment phase 1 too; false trains the head on cached backbone features (far faster)"
    )


def strong_augment(cfg: AugmentConfig, size: int, seed: int) -> A.Compose:
    """Geometry, then colour, then degradation, then erasing; seeded so a run can be repeated."""
    geometry: list[A.BasicTransform] = []
    if cfg.hflip:
        geometry.append(A.HorizontalFlip(p=0.5))
    if cfg.crop_scale < 1.0:
        geometry.append(A.RandomResizedCrop(size=(size, size), scale=(cfg.crop_scale, 1.0), p=1.0))
    if cfg.rotate or cfg.translate:
        geometry.append(
            A.Affine(rotate=(-cfg.rotate, cfg.rotate), translate_percent=(-cfg.translate, cfg.translate), p=0.7)
        )
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
    erase: list[A.BasicTransform] = []
    if cfg.erase:
        erase.append(
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(0.2, 0.4), hole_width_range=(0.2, 0.4), p=cfg.erase
            )
        )
    return A.Compose(geometry + colour + degrade + erase, seed=seed)


def augment_batch(images: torch.Tensor, transform: A.Compose) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3), each image through `transform`."""
    out = [transform(image=img)["image"] for img in images.numpy()]
    return torch.from_numpy(np.stack(out))
