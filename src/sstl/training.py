"""The training loop shared by teacher, student and fine-tuning.

Two phases, as in the seeds' transfer learning: (1) the head on a frozen backbone at `lr` (on the
backbone's features, computed once, when there is no augmentation), (2) the top `unfreeze_blocks`
blocks unfrozen at `finetune_lr`. Each phase: Adam, LR x0.1 when the
validation loss plateaus, early stopping on it, and the best weights restored at the end.
`fit` returns the per-epoch history; the caller logs it (see `tracking`).
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
import timm
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from sstl.dataset import ImageSet
from sstl.errors import SstlError
from sstl.files import atomic_path
from sstl.inference import infer
from sstl.models import Classifier, model_digest, set_trainable, train_mode
from sstl.runtime import CPU, Runtime, world
from sstl.transforms import augment_batch


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
    freeze_bn: bool = Field(
        False, description="BatchNorm keeps its pretrained statistics in phase 2 (few photos, strong augmentation)"
    )
    monitor: Literal["val_loss", "val_acc"] = Field(
        "val_loss",
        description="what early stopping, LR drops and the kept weights follow; val_acc (ties: lower loss) "
        "suits pseudo-labelled training, whose val loss rises with confidence while accuracy still improves",
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# batch index (B,) -> the network's input for those rows, on the runtime's device
Inputs = Callable[[torch.Tensor], torch.Tensor]


def image_inputs(model: Classifier, images: torch.Tensor, runtime: Runtime, augment: A.Compose | None = None) -> Inputs:
    """Rows of uint8 (N, H, W, 3): augmented on the host (albumentations), then moved and normalised."""

    def get(idx: torch.Tensor) -> torch.Tensor:
        x = images[idx]
        if augment is not None:
            x = augment_batch(x, augment)
        return model.preprocess(runtime.put(x))

    return get


def feature_inputs(features: torch.Tensor, runtime: Runtime) -> Inputs:
    """Rows of precomputed backbone features (N, D): phase 1 trains the head on these alone."""
    return lambda idx: runtime.put(features[idx])


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c), (C,); absent classes get 0. Balanced data gives all ones."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(()))


@dataclass
class Step:
    """What one optimisation step needs besides the batch: built once per phase."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    runtime: Runtime


def train_epoch(
    net: nn.Module, inputs: Inputs, labels: torch.Tensor, step: Step, *, batch_size: int, generator: torch.Generator
) -> dict[str, float]:
    """One pass over shuffled `labels`' rows; under torchrun each process takes every W-th row of a batch.

    `net` is the trained module (the model, its head on features, or either wrapped in DDP); the caller
    sets train/eval modes. A non-finite loss stops training with the epoch's batch and learning rate.
    """
    rank, size = world()
    total, correct, loss_sum = 0, 0, 0.0
    order = torch.randperm(len(labels), generator=generator)  # the same on every process: same seed
    for b, idx in enumerate(order.split(batch_size)):
        if len(idx) < 2 * size:  # a last batch too small for BatchNorm (2 rows) on every process: all skip it
            continue
        idx = idx[rank::size]
        y = step.runtime.put(labels[idx])
        step.optimizer.zero_grad(set_to_none=True)
        with step.runtime.autocast():  # forward only: backward follows the dtypes autocast recorded
            logits = net(inputs(idx)).float()  # (B, C) fp32, so the loss and its gradient start in fp32
        loss = step.loss_fn(logits, y)
        if not _all_finite(loss):
            lr = step.optimizer.param_groups[0]["lr"]
            raise SstlError(f"training diverged: loss {loss.item()} at batch {b + 1} (lr {lr:g}): lower the lr")
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum().item())
        total += len(y)
    return {"train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1)}


@torch.inference_mode()
def evaluate_loss(
    net: nn.Module, inputs: Inputs, labels: torch.Tensor, *, runtime: Runtime = CPU, batch_size: int = 256
) -> dict[str, float]:
    """Mean cross-entropy and accuracy on a labelled set (no class weights: the honest objective)."""
    net.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for idx in torch.arange(len(labels)).split(batch_size):
        y = runtime.put(labels[idx])
        with runtime.autocast():
            logits = net(inputs(idx)).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum().item())
        total += len(y)
    return {"val_loss": loss_sum / total, "val_acc": correct / total}


def features(
    model: Classifier, images: torch.Tensor, *, runtime: Runtime = CPU, cache_dir: Path | None = None
) -> torch.Tensor:
    """Pooled backbone features (N, D) of uint8 images: computed once, then read from `cache_dir`.

    The cache key is the backbone's weights, the images' bytes and the runtime (bf16 and GPU features
    differ in the last bits), so a changed backbone or dataset never reads stale features.
    """
    path = None
    if cache_dir is not None:
        # weights alone do not name the function: two archs can share a state dict's bytes (e.g. timm's
        # efficientnet_lite0 and tf_efficientnet_lite0 differ in padding), so the code and versions count too
        h = hashlib.sha256(model_digest(model.backbone).encode())
        h.update(repr(model.backbone).encode() + model.data.model_dump_json().encode())
        device = runtime.describe()["device_name"]
        h.update(f"{tuple(images.shape)}:{runtime.precision}:{device}:{torch.__version__}:{timm.__version__}".encode())
        h.update(images.contiguous().numpy().tobytes())
        path = Path(cache_dir) / f"{h.hexdigest()[:32]}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    out = infer(model, images, runtime=runtime, desc="features", features=True)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(out, tmp)
    return out


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
    *,
    num_classes: int,
    seed: int,
    runtime: Runtime = CPU,
    augment: A.Compose | None = None,
    augment_head: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
    feature_cache: Path | None = None,
) -> FitResult:
    """Train in the two phases; returns the history (one dict per epoch) and the best val loss.

    Phase 1 (head only) without augmentation (none given, or `augment_head` off) trains on the
    backbone's features, computed once (and cached in `feature_cache`): the frozen backbone would give
    the same features every epoch.
    `runtime` applies to every forward pass, validation included; weights stay fp32. Under torchrun,
    gradients are averaged across processes (DDP) and every process ends with the same weights.
    """
    seed_everything(seed)
    model.to(runtime.device)
    generator = torch.Generator().manual_seed(seed)
    weight = class_weights(train.labels, num_classes).to(runtime.device) if cfg.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    n_blocks = len(model.blocks)
    phases = [(0, cfg.head_epochs, cfg.lr), (min(cfg.unfreeze_blocks, n_blocks), cfg.epochs, cfg.finetune_lr)]

    history: list[dict[str, float]] = []
    start, seen = time.perf_counter(), 0
    bar = tqdm(total=cfg.head_epochs + cfg.epochs, desc=desc, unit="epoch", disable=None if world()[0] == 0 else True)
    for phase, (unfrozen, epochs, lr) in enumerate(phases, start=1):
        if epochs == 0:
            continue
        set_trainable(model, unfrozen)
        noise = augment if unfrozen > 0 or augment_head else None
        net, train_in, val_in = _phase_inputs(model, train, val, unfrozen, noise, runtime, feature_cache)
        params = [p for p in model.parameters() if p.requires_grad]
        step = Step(
            torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay), loss_fn, runtime.grad_scaler(), runtime
        )
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(step.optimizer, factor=0.1, patience=cfg.plateau_patience)
        trained = _data_parallel(net, runtime)
        best_state, stale = copy.deepcopy(model.state_dict()), 0
        start_row = evaluate_loss(net, val_in, val.labels, runtime=runtime) if phase > 1 else None
        phase_best = _score(start_row, cfg.monitor) if start_row else (float("inf"), float("inf"))
        for _ in range(epochs):
            t0 = time.perf_counter()
            row = {"phase": phase, "lr": step.optimizer.param_groups[0]["lr"]}
            train_mode(model, unfrozen, freeze_bn=cfg.freeze_bn)
            row |= train_epoch(trained, train_in, train.labels, step, batch_size=cfg.batch_size, generator=generator)
            _sync_buffers(model)
            row |= evaluate_loss(net, val_in, val.labels, runtime=runtime)
            row |= {"epoch": len(history) + 1, "seconds": time.perf_counter() - t0}
            seen += len(train)
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            bar.update(1)
            score = _agreed(_score(row, cfg.monitor))  # every process takes rank 0's decisions
            plateau.step(score[0])
            if score < phase_best:
                phase_best, stale = score, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        model.load_state_dict(best_state)
    bar.close()
    # the restored best weights, measured once more
    final = evaluate_loss(model, image_inputs(model, val.images, runtime), val.labels, runtime=runtime)
    return FitResult(history, final["val_loss"], final["val_acc"], time.perf_counter() - start, seen)


def _phase_inputs(
    model: Classifier,
    train: ImageSet,
    val: ImageSet,
    unfrozen: int,
    augment: A.Compose | None,
    runtime: Runtime,
    cache: Path | None,
) -> tuple[nn.Module, Inputs, Inputs]:
    """(trained module, train inputs, val inputs): the head on cached features, or the whole model on images."""
    if unfrozen == 0 and augment is None:
        train_f = features(model, train.images, runtime=runtime, cache_dir=cache)
        val_f = features(model, val.images, runtime=runtime, cache_dir=cache)
        return model.head, feature_inputs(train_f, runtime), feature_inputs(val_f, runtime)
    return model, image_inputs(model, train.images, runtime, augment), image_inputs(model, val.images, runtime)


def _data_parallel(net: nn.Module, runtime: Runtime) -> nn.Module:
    """`net` wrapped in DistributedDataParallel under torchrun (gradients all-reduced), else itself."""
    if world()[1] == 1:
        return net
    ids = [runtime.device.index] if runtime.cuda else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)


def _sync_buffers(model: nn.Module) -> None:
    """Average the statistics of BatchNorm layers that trained this epoch across processes, so every
    process validates (and saves) one model; frozen statistics are left bit for bit as they are."""
    rank, size = world()
    if size == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(size)


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one process's NaN stops them all, none hangs)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if world()[1] > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _score(row: dict[str, float], monitor: str) -> tuple[float, float]:
    """Lower is better: (val loss, 0), or (-val accuracy, val loss) so that ties in accuracy go to the lower loss."""
    return (row["val_loss"], 0.0) if monitor == "val_loss" else (-row["val_acc"], row["val_loss"])


def _agreed(score: tuple[float, float]) -> tuple[float, float]:
    """Rank 0's score on every process: early stopping and LR drops must not differ by a last bit."""
    if world()[1] == 1:
        return score
    t = torch.tensor(score, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t[0]), float(t[1])
