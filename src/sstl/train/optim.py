"""Optimisers, learning-rate schedules, Lookahead weight averaging and class weights of the training loop."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from sstl.config.train import TrainConfig


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c), (C,); absent classes get 0. Balanced data gives all ones."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(()))


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum, over the trainable parameters. With `bias_lr_scale` != 1 the
    backbone's biases and BatchNorm shifts (its 1-d parameters; not the head's) form a group of their own
    at lr x scale and weight decay / scale, so that their decay per step stays the same (airbench)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": trainable, "lr": lr, "weight_decay": cfg.weight_decay}]
    if cfg.bias_lr_scale != 1.0:
        scale, backbone = cfg.bias_lr_scale, getattr(model, "backbone", model)
        shifts = {id(p) for p in backbone.parameters() if p.ndim <= 1}
        groups = [
            {"params": [p for p in trainable if id(p) not in shifts], "lr": lr, "weight_decay": cfg.weight_decay},
            {
                "params": [p for p in trainable if id(p) in shifts],
                "lr": lr * scale,
                "weight_decay": cfg.weight_decay / scale,
            },
        ]
    if cfg.optimizer == "sgd":
        # torch refuses Nesterov without momentum: momentum 0 is plain SGD
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.Adam(groups, lr=lr)


def linear_factor(step: int, total: int, warmup: float) -> float:
    """LR multiplier at `step` of `total` (airbench): 0.2 -> 1 over the warm-up, then 1 -> 0.07 at the end."""
    up = int(total * warmup)
    if step < up:
        return 0.2 + 0.8 * step / up
    return 1.0 - 0.93 * (step - up) / max(total - up, 1)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> Any:
    """ReduceLROnPlateau (stepped per epoch with the val score), or the linear schedule (stepped per batch)."""
    if cfg.lr_schedule == "linear":
        factor = functools.partial(linear_factor, total=total, warmup=cfg.warmup)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=cfg.plateau_patience)


class Lookahead:
    """airbench's weight averaging: an average of the weights (BatchNorm statistics too) whose decay rises as
    0.95^5 (t / T)^3 over a phase's T steps; every 5 steps the network restarts from it. Early on it barely
    holds the weights back; late, it damps the noise of the last steps like an EMA."""

    def __init__(self, model: nn.Module, total: int) -> None:
        self.model, self.total, self.t = model, max(total, 1), 0
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def step(self) -> None:
        self.t += 1
        if self.t % 5 == 0:
            self._sync(0.95**5 * (self.t / self.total) ** 3)

    def finish(self) -> None:
        """The network takes the average itself."""
        self._sync(1.0)

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        state = self.model.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1.0 - decay)
            state[k].copy_(avg)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "average": self.average}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.t = saved["t"]
        for k, avg in self.average.items():
            avg.copy_(saved["average"][k])
