"""Rotation pretraining: the pretext data, a short real training, and `weights: pretrain`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sstl.config.model import ModelConfig
from sstl.config.train import PretrainConfig
from sstl.core.errors import SstlError
from sstl.models.checkpoint import save_checkpoint
from sstl.models.factory import create_model
from sstl.models.weights import resolve_weights
from sstl.runtime.device import CPU
from sstl.train.pretrain import ROTATIONS, pretrain_rotation, rotations, write_disabled


def test_rotations_are_the_four_quarter_turns() -> None:
    img = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    x, y = rotations(img)
    assert x.shape == (8, 4, 4, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(x[2], torch.rot90(img[0], 1, dims=(0, 1)))
    assert torch.equal(torch.rot90(x[6], 1, dims=(0, 1)), img[0])  # 270 + 90 = a full turn


def test_pretrain_learns_rotation_and_feeds_a_teacher(tmp_path: Path) -> None:
    # an "up" that can be learnt: a bright bar at the top of each noisy image
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 60, (160, 16, 16, 3), dtype=np.uint8)
    pool[:, :3] = 230
    cfg = PretrainConfig(enabled=True, arch="convnet_s", epochs=3, lr=3e-3, batch_size=64, val_fraction=0.2)
    model, model_cfg, result = pretrain_rotation(pool, cfg, seed=0, runtime=CPU)
    assert result.best_val_acc > 0.9  # 4 classes: chance is 0.25
    path = tmp_path / "pretrain.pt"
    save_checkpoint(path, model, model_cfg, list(ROTATIONS), 16)
    teacher_cfg = resolve_weights(ModelConfig(arch="convnet_s", weights="pretrain"), path)
    assert teacher_cfg.weights == str(path)
    teacher = create_model(teacher_cfg, 10)
    assert torch.equal(teacher.blocks[0][0].weight, model.blocks[0][0].weight)


def test_weights_pretrain_refused_when_the_stage_is_off(tmp_path: Path) -> None:
    marker = tmp_path / "pretrain.pt"
    write_disabled(marker)
    with pytest.raises(SstlError, match="pretrain.enabled=true"):
        resolve_weights(ModelConfig(weights="pretrain"), marker)
    with pytest.raises(SstlError, match="pretrain.enabled=true"):
        resolve_weights(ModelConfig(weights="pretrain"), tmp_path / "missing.pt")
    assert resolve_weights(ModelConfig(weights="none"), marker).weights == "none"
