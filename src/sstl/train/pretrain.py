"""Self-supervised pretraining on the unlabelled pool: predict the rotation (0/90/180/270 degrees).

Seeds 002/003: when no ImageNet weights fit (offline, or a domain far from ImageNet), the pool
itself is the transfer source. The backbone learns to tell which way is up; teacher and student can
start from its blocks (`weights: pretrain`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sstl.config.model import ModelConfig
from sstl.config.train import PretrainConfig, TrainConfig
from sstl.core.files import atomic_path
from sstl.data.dataset import ImageSet
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model
from sstl.runtime.device import Runtime
from sstl.train.loop import FitResult, fit, seed_everything
from sstl.train.setup import FitSetup

ROTATIONS = ("0", "90", "180", "270")


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, S, S, 3) -> (uint8 (4N, S, S, 3), int64 (4N,)): every image at 0, 90, 180, 270 degrees."""
    rotated = torch.cat([torch.rot90(images, k, dims=(1, 2)) for k in range(4)])
    return rotated, torch.arange(4).repeat_interleave(len(images))


def pretrain_rotation(
    pool: np.ndarray,
    cfg: PretrainConfig,
    *,
    seed: int,
    runtime: Runtime,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    state: Path | None = None,
) -> tuple[Classifier, ModelConfig, FitResult]:
    """Train `cfg.arch` on the rotation pretext task over (a sample of) the pool, uint8 (N, S, S, 3).

    `state`: fit's per-epoch resumable state (a killed pretraining resumes after its last epoch)."""
    rng = np.random.default_rng(seed)
    n = len(pool) if cfg.max_images == 0 else min(cfg.max_images, len(pool))
    chosen = np.sort(rng.permutation(len(pool))[:n])
    images = torch.from_numpy(np.asarray(pool[chosen]))
    n_val = max(1, round(n * cfg.val_fraction))
    train_x, train_y = rotations(images[n_val:])
    val_x, val_y = rotations(images[:n_val])
    train = ImageSet(train_x, train_y, [""] * len(train_y))
    val = ImageSet(val_x, val_y, [""] * len(val_y))
    model_cfg = ModelConfig(arch=cfg.arch, head_layers=0, dropout=0.0)
    seed_everything(seed)
    model = create_model(model_cfg, len(ROTATIONS))
    schedule = TrainConfig(
        head_epochs=0, epochs=cfg.epochs, finetune_lr=cfg.lr, unfreeze_blocks=1000, batch_size=cfg.batch_size
    )
    result = fit(
        model,
        train,
        val,
        schedule,
        FitSetup(num_classes=len(ROTATIONS), seed=seed, runtime=runtime, desc="pretrain"),
        on_epoch=on_epoch,
        state=state,
    )
    return model, model_cfg, result


def write_disabled(path: Path) -> None:
    """The stage's output when pretraining is off: a marker that `resolve_weights` refuses with advice."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: the same bytes every run (a path
        torch.save({"disabled": True}, f)  # would name torch's zip folder after the random temp file)
