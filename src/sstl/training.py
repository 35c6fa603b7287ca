"""The training loop shared by teacher, student and fine-tuning.

Two phases, as in the seeds' transfer learning: (1) the head on a frozen backbone at `lr`,
(2) the top `unfreeze_blocks` blocks unfrozen at `finetune_lr`. Each phase: Adam, LR x0.1 when the
validation loss plateaus, early stopping on it, and the best weights restored at the end.
`fit` returns the per-epoch history; the caller logs it (see `tracking`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from sstl.dataset import ImageSet
from sstl.models import Classifier, set_trainable, train_mode
from sstl.precision import Precision, autocast
from sstl.transforms import augment_batch, normalize


class TrainConfig(BaseModel):
    """How a network is trained. Epoch counts are maxima: early stopping may end a phase sooner."""

    model_config = ConfigDict(extra="forbid")

    head_epochs: int = Field(3, ge=0, description="phase 1: head only, backbone frozen")
    epochs: int = Field(15, ge=0, description="phase 2: top blocks unfrozen")
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    finetune_lr: float = Field(3e-4, gt=0.0, le=1.0)
    unfreeze_blocks: int = Field(5, ge=0, description="top backbone blocks trained in phase 2")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    patience: int = Field(4, ge=1, description="early stopping: epochs without val-loss improvement")
    plateau_patience: int = Field(2, ge=0, description="epochs without improvement before LR x0.1")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches(
    data: ImageSet, batch_size: int, generator: torch.Generator | None = None, augment: A.Compose | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float (B, 3, H, W), y int64 (B,)); shuffled when a generator is given."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for idx in order.split(batch_size):
        images = data.images[idx]
        if augment is not None:
            images = augment_batch(images, augment)
        yield normalize(images), data.labels[idx]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c), (C,); absent classes get 0. Balanced data gives all ones."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(()))


def train_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: ImageSet,
    batch_size: int,
    generator: torch.Generator,
    unfrozen: int,
    augment: A.Compose | None = None,
    precision: Precision = "fp32",
) -> dict[str, float]:
    train_mode(model, unfrozen)
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches(data, batch_size, generator, augment):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):  # forward only: backward follows the dtypes autocast recorded
            logits = model(x).float()  # (B, C) fp32, so the loss and its gradient start in fp32
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return {"train_loss": loss_sum / total, "train_acc": correct / total}


@torch.inference_mode()
def evaluate_loss(
    model: Classifier, data: ImageSet, batch_size: int = 256, precision: Precision = "fp32"
) -> dict[str, float]:
    """Mean cross-entropy and accuracy on a labelled set (no class weights: the honest objective)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches(data, batch_size):
        with autocast(precision):
            logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return {"val_loss": loss_sum / total, "val_acc": correct / total}


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_loss: float
    best_val_acc: float
    seconds: float
    images_seen: int

    @property
    def images_per_second(self) -> float:
        return self.images_seen / max(self.seconds, 1e-9)


def fit(
    model: Classifier,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    num_classes: int,
    seed: int,
    augment: A.Compose | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
    precision: Precision = "fp32",
) -> FitResult:
    """Train in the two phases; returns the history (one dict per epoch) and the best val loss.

    `precision` applies to every forward pass, validation included; weights stay fp32.
    """
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    weight = class_weights(train.labels, num_classes) if cfg.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    n_blocks = len(model.blocks)
    phases = [(0, cfg.head_epochs, cfg.lr), (min(cfg.unfreeze_blocks, n_blocks), cfg.epochs, cfg.finetune_lr)]

    history: list[dict[str, float]] = []
    start, seen = time.perf_counter(), 0
    bar = tqdm(total=cfg.head_epochs + cfg.epochs, desc=desc, unit="epoch", disable=None)
    for phase, (unfrozen, epochs, lr) in enumerate(phases, start=1):
        if epochs == 0:
            continue
        set_trainable(model, unfrozen)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=cfg.plateau_patience)
        best_state, stale = copy.deepcopy(model.state_dict()), 0
        phase_best = evaluate_loss(model, val, precision=precision)["val_loss"] if phase > 1 else float("inf")
        for _ in range(epochs):
            t0 = time.perf_counter()
            row = {"phase": phase, "lr": optimizer.param_groups[0]["lr"]}
            row |= train_epoch(
                model, optimizer, loss_fn, train, cfg.batch_size, generator, unfrozen, augment, precision
            )
            row |= evaluate_loss(model, val, precision=precision)
            row |= {"epoch": len(history) + 1, "seconds": time.perf_counter() - t0}
            seen += len(train)
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            bar.update(1)
            plateau.step(row["val_loss"])
            if row["val_loss"] < phase_best:
                phase_best, stale = row["val_loss"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        model.load_state_dict(best_state)
    bar.close()
    final = evaluate_loss(model, val, precision=precision)  # the restored best weights, measured once more
    return FitResult(history, final["val_loss"], final["val_acc"], time.perf_counter() - start, seen)
