"""The training loop shared by teacher, student and fine-tuning.

Two phases, as in the seeds' transfer learning: (1) the head on a frozen backbone at `lr` (on the
backbone's features, computed once, when there is no augmentation), (2) the top `unfreeze_blocks`
blocks unfrozen at `finetune_lr`. Each phase, by default (`lr_schedule: plateau`): Adam, LR x0.1 when the
validation loss plateaus, early stopping on it, and the best weights restored at the end. The fast
recipe for small networks from scratch (airbench; `lr_schedule: linear`): SGD with Nesterov momentum,
a linear warm-up then linear decay per step, label smoothing, Lookahead weight averaging, every epoch
run and the last weights kept. `fit` returns the per-epoch history; the caller logs it (see `tracking`).

Given a `state` path, `fit` saves everything the next epoch depends on after every epoch (weights,
optimizer, scheduler, early-stopping bookkeeping, every RNG), so a process killed at any moment
resumes after its last finished epoch and ends with the same weights, bit for bit, as one never killed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from sstl.dataset import ImageSet
from sstl.errors import DivergedError
from sstl.files import atomic_path
from sstl.inference import infer
from sstl.models import Classifier, fit_whitening, model_digest, set_trainable, train_mode
from sstl.runtime import CPU, Runtime, world
from sstl.transforms import Augmenter


class TrainConfig(BaseModel):
    """How a network is trained. Epoch counts are maxima: early stopping may end a phase sooner."""

    model_config = ConfigDict(extra="forbid")

    head_epochs: int = Field(3, ge=0, description="phase 1: head only, backbone frozen")
    epochs: int = Field(15, ge=0, description="phase 2: top blocks unfrozen")
    lr: float = Field(1e-3, gt=0.0, le=100.0)
    finetune_lr: float = Field(3e-4, gt=0.0, le=100.0)
    unfreeze_blocks: int = Field(5, ge=0, description="top backbone blocks trained in phase 2")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "sgd"] = Field("adam", description="sgd: Nesterov momentum `momentum`")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd's momentum")
    lr_schedule: Literal["plateau", "linear"] = Field(
        "plateau",
        description="plateau: LR x0.1 on a val plateau, early stopping, best weights kept; linear: warm-up from "
        "0.2 x lr over `warmup` of the steps, then linear decay to 0.07 x lr, all epochs, last weights kept",
    )
    warmup: float = Field(0.23, ge=0.0, lt=1.0, description="linear: share of the steps spent warming up")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    lookahead: bool = Field(
        False, description="every 5 steps the weights restart from their running average (airbench's Lookahead)"
    )
    bias_lr_scale: float = Field(
        1.0, gt=0.0, description="LR multiplier of biases and BatchNorm shifts (their weight decay divided by it)"
    )
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


def image_inputs(model: Classifier, images: torch.Tensor, runtime: Runtime, augment: Augmenter | None = None) -> Inputs:
    """Rows of uint8 (N, H, W, 3), augmented in two parts: per image on the host (albumentations, when
    the config has such layers), then moved, then batched on the device (flip, translate, cutout);
    then normalised."""

    def get(idx: torch.Tensor) -> torch.Tensor:
        if augment is None:
            return model.preprocess(runtime.put(images[idx]))
        x = runtime.put(augment.host(images[idx]))
        return model.preprocess(augment.batched(x))

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
    after: Callable[[], None] | None = None  # per-step work after the update: LR schedule, Lookahead


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches `train_epoch` trains on n rows: a last one too small for BatchNorm on every process is skipped."""
    size = world()[1]
    return n // batch_size + (1 if n % batch_size >= 2 * size else 0)


def train_epoch(
    net: nn.Module,
    inputs: Inputs,
    labels: torch.Tensor,
    step: Step,
    *,
    batch_size: int,
    generator: torch.Generator,
    epoch: int = 0,
    targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over shuffled `labels`' rows; under torchrun each process takes every W-th row of a batch.

    `targets`: soft targets (N, C) (rows sum to 1: pseudo-labels as distributions) the loss follows
    instead of `labels`, which still score the training accuracy.

    `net` is the trained module (the model, its head on features, or either wrapped in DDP); the caller
    sets train/eval modes. A non-finite loss stops training with one line naming the epoch (the
    history's number, 1-based), the batch and the learning rate: where to look, and what to lower.
    """
    rank, size = world()
    total, correct, loss_sum = 0, 0, 0.0
    order = torch.randperm(len(labels), generator=generator)  # the same on every process: same seed
    for b, idx in enumerate(order.split(batch_size)):
        if len(idx) < 2 * size:  # a last batch too small for BatchNorm (2 rows) on every process: all skip it
            continue
        idx = idx[rank::size]
        y = step.runtime.put(labels[idx])
        target = y if targets is None else step.runtime.put(targets[idx])
        step.optimizer.zero_grad(set_to_none=True)
        with step.runtime.autocast():  # forward only: backward follows the dtypes autocast recorded
            logits = net(inputs(idx)).float()  # (B, C) fp32, so the loss and its gradient start in fp32
        loss = step.loss_fn(logits, target)
        if not _all_finite(loss):
            lr = step.optimizer.param_groups[0]["lr"]
            raise DivergedError(
                f"training diverged: loss {loss.item()} at epoch {epoch}, batch {b + 1} (lr {lr:g}): lower the lr"
            )
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
        if step.after is not None:
            step.after()
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
        with atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: torch names the zip folder
            torch.save(out, f)  # "archive", not after the random temp name, so equal features give equal bytes
    return out


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_loss: float
    best_val_acc: float
    seconds: float  # wall time of all the epochs, those of a killed run that this one resumed included
    images_seen: int
    resumed_from_epoch: int = 0  # epochs a saved state supplied (0: trained from the start)

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
    augment: Augmenter | None = None,
    augment_head: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
    feature_cache: Path | None = None,
    state: Path | None = None,
    keep_state: bool = False,
    targets: torch.Tensor | None = None,
) -> FitResult:
    """Train in the two phases; returns the history (one dict per epoch) and the best val loss.

    Phase 1 (head only) without augmentation (none given, or `augment_head` off) trains on the
    backbone's features, computed once (and cached in `feature_cache`): the frozen backbone would give
    the same features every epoch.
    `runtime` applies to every forward pass, validation included; weights stay fp32. Under torchrun,
    gradients are averaged across processes (DDP) and every process ends with the same weights.
    `state`: after each epoch rank 0 saves a resumable state there; a later call with the same
    arguments (same fingerprint) continues after its last epoch. Removed when fit returns, unless
    `keep_state`: then the caller removes it (`drop_state`) once it has written what it makes of the
    fit, so that a kill in between does not cost the whole training (the state resumes at its end).
    `on_epoch` sees only the epochs this call trains (`history` holds the resumed ones too).
    `targets`: soft targets (N, C) for `train`'s rows (see `train_epoch`); None: its labels.
    A network with a whitening layer (airbench) not fitted yet gets it from `train`'s first images.
    """
    seed_everything(seed)
    fit_whitening(model, train.images)
    model.to(runtime.device)
    generator = torch.Generator().manual_seed(seed)
    saver = _Saver(state, generator, augment)
    if state is not None:
        saver.fingerprint = fingerprint(
            model,
            train,
            val,
            cfg,
            num_classes=num_classes,
            seed=seed,
            runtime=runtime,
            augment=augment,
            augment_head=augment_head,
            targets=targets,
        )
    saved = saver.load(desc, cfg.head_epochs + cfg.epochs)
    weight = class_weights(train.labels, num_classes).to(runtime.device) if cfg.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    run = _Run(model, train, val, cfg, runtime, loss_fn, generator, saver, on_epoch, targets)
    if saved is not None:
        run.history, run.seen = list(saved["history"]), saved["seen"]
        run.start -= saved["seconds"]  # FitResult.seconds counts the killed runs' epochs too
    resumed = len(run.history)
    n_blocks = len(model.blocks)
    phases = [(0, cfg.head_epochs, cfg.lr), (min(cfg.unfreeze_blocks, n_blocks), cfg.epochs, cfg.finetune_lr)]
    lead = world()[0] == 0
    with tqdm(
        total=cfg.head_epochs + cfg.epochs, initial=resumed, desc=desc, unit="epoch", disable=None if lead else True
    ) as run.bar:
        try:
            for phase, (unfrozen, epochs, lr) in enumerate(phases, start=1):
                if epochs == 0 or (saved is not None and phase < saved["phase"]):
                    continue  # nothing to train, or finished before the state was saved
                here = saved if saved is not None and phase == saved["phase"] else None
                if here is not None:  # before the phase's features: the backbone they come from
                    model.load_state_dict(here["model"])
                noise = augment if unfrozen > 0 or augment_head else None
                inputs = _phase_inputs(model, train, val, unfrozen, noise, runtime, feature_cache)
                run.phase(phase, unfrozen=unfrozen, epochs=epochs, lr=lr, inputs=inputs, saved=here)
        except DivergedError:
            # The state is dropped (a full disk, another SstlError, keeps the last epoch's). Re-running the same
            # arguments would replay the same epochs into the same NaN (every RNG is restored), and the advised
            # fix, a lower lr, changes the fingerprint, so no later run could use it: keeping it would only
            # leave a stale file behind.
            saver.drop()
            raise
    # the restored best weights, measured once more
    final = evaluate_loss(model, image_inputs(model, val.images, runtime), val.labels, runtime=runtime)
    if not keep_state:
        saver.drop()
    return FitResult(run.history, final["val_loss"], final["val_acc"], run.elapsed(), run.seen, resumed)


@dataclass
class _Stopping:
    """One phase's early stopping: the best score and weights so far, epochs run and epochs without gain."""

    best_score: tuple[float, float]  # lower is better, see _score
    best_state: dict[str, torch.Tensor]
    stale: int = 0
    done: int = 0

    def update(self, score: tuple[float, float], model: nn.Module) -> bool:
        """Count a finished epoch; whether it improved (and its weights became the best)."""
        self.done += 1
        if score < self.best_score:
            self.best_score, self.stale = score, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return True
        self.stale += 1
        return False


@dataclass
class _Run:
    """What one fit's phases share: its fixed inputs and the running history."""

    model: Classifier
    train: ImageSet
    val: ImageSet
    cfg: TrainConfig
    runtime: Runtime
    loss_fn: nn.Module
    generator: torch.Generator
    saver: _Saver
    on_epoch: Callable[[dict[str, float]], None] | None
    targets: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seen: int = 0  # training images, summed over epochs
    start: float = field(default_factory=time.perf_counter)
    bar: Any = None  # tqdm over all epochs

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def phase(
        self,
        phase: int,
        *,
        unfrozen: int,
        epochs: int,
        lr: float,
        inputs: tuple[nn.Module, Inputs, Inputs],
        saved: dict[str, Any] | None,
    ) -> None:
        """Train up to `epochs` with `unfrozen` top blocks, from the start or from `saved`; keep the best."""
        model, (net, _, val_in), cfg = self.model, inputs, self.cfg
        set_trainable(model, unfrozen)
        optimizer = make_optimizer(model, cfg, lr)
        per_step = cfg.lr_schedule == "linear"  # else the LR follows val plateaus, epoch by epoch
        total = epochs * steps_per_epoch(len(self.train), cfg.batch_size)
        scheduler = make_scheduler(optimizer, cfg, total)
        average = Lookahead(model, total) if cfg.lookahead else None

        def after_step() -> None:
            if per_step:
                scheduler.step()
            if average is not None:
                average.step()

        step = Step(optimizer, self.loss_fn, self.runtime.grad_scaler(), self.runtime, after_step)
        trained = _data_parallel(net, self.runtime)
        if saved is None:
            first = evaluate_loss(net, val_in, self.val.labels, runtime=self.runtime) if phase > 1 else None
            stop = _Stopping(_score(first, cfg.monitor) if first else (math.inf, math.inf), _copy(model))
        else:  # after the set-up: the saved RNG states already count whatever it drew
            stop = _restore(saved, step=step, plateau=scheduler, saver=self.saver)
            if average is not None:
                average.load_state_dict(saved["lookahead"])
        while stop.done < epochs and (per_step or stop.stale < cfg.patience):
            row = self.epoch(phase, unfrozen=unfrozen, trained=trained, inputs=inputs, step=step)
            score = _agreed(_score(row, cfg.monitor))  # every process takes rank 0's decisions
            if not per_step:
                scheduler.step(score[0])  # ReduceLROnPlateau: the metric
            improved = stop.update(score, model)
            self.saver.save(
                phase=phase,
                done=stop.done,
                stale=stop.stale,
                best_score=list(stop.best_score),
                model=model.state_dict(),
                # None: the best is `model` (half the bytes), or unused (a linear schedule keeps the last)
                best=None if improved or per_step else stop.best_state,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=step.scaler.state_dict(),
                lookahead=None if average is None else average.state_dict(),
                history=self.history,
                seen=self.seen,
                seconds=self.elapsed(),
            )
        if average is not None:
            average.finish()
        if not per_step:
            model.load_state_dict(stop.best_state)

    def epoch(
        self, phase: int, *, unfrozen: int, trained: nn.Module, inputs: tuple[nn.Module, Inputs, Inputs], step: Step
    ) -> dict[str, float]:
        """Train one epoch, validate, append the history row and report it."""
        net, train_in, val_in = inputs
        t0, number = time.perf_counter(), len(self.history) + 1
        row = {"phase": phase, "lr": step.optimizer.param_groups[0]["lr"]}
        train_mode(self.model, unfrozen, freeze_bn=self.cfg.freeze_bn)
        batch = self.cfg.batch_size
        row |= train_epoch(
            trained,
            train_in,
            self.train.labels,
            step,
            batch_size=batch,
            generator=self.generator,
            epoch=number,
            targets=self.targets,
        )
        _sync_buffers(self.model)
        row |= evaluate_loss(net, val_in, self.val.labels, runtime=self.runtime)
        row |= {"epoch": number, "seconds": time.perf_counter() - t0}
        self.seen += len(self.train)
        self.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(row)
        self.bar.update(1)
        return row


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


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


STATE_VERSION = 1
HASH_BYTES = 256 * 2**20  # data hashed per set in the fingerprint: every k-th image beyond this


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of shapes, labels and image bytes (every k-th row past HASH_BYTES): cheap next to one epoch,
    and a changed dataset (DVC re-runs the stage for it) never resumes a state trained on the old one."""
    h = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}:{tuple(labels.shape)}".encode())
    h.update(labels.contiguous().numpy().tobytes())
    stride = max(1, math.ceil(images.numel() * images.element_size() / HASH_BYTES))
    h.update(images[::stride].contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    *,
    num_classes: int,
    seed: int,
    runtime: Runtime,
    augment: Augmenter | None,
    augment_head: bool,
    targets: torch.Tensor | None = None,
) -> str:
    """sha256 of what decides a fit's every step: a state saved under another one is not resumed.

    The schedule, seed, starting weights, data, augmentation (and its seeded RNGs), device, precision,
    world size and torch version: a state from any other fit would not continue this one bit for bit.
    """
    h = hashlib.sha256()
    parts = (
        cfg.model_dump_json(),
        seed,
        num_classes,
        model_digest(model),
        None if augment is None else augment.describe(),  # its config, seed and RNG position
        augment_head,
        runtime.precision,
        runtime.describe()["device_name"],
        world()[1],
        torch.__version__,
    )
    for part in parts:
        h.update(f"{part}\n".encode())
    for data in (train, val):
        h.update(data_digest(data.images, data.labels).encode())
    if targets is not None:
        h.update(hashlib.sha256(targets.float().contiguous().numpy().tobytes()).digest())
    return h.hexdigest()


def rng_state(generator: torch.Generator, augment: Augmenter | None) -> dict[str, Any]:
    """Every random stream a training epoch draws from, as plain values (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # uint32 (624,) -> ints
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "augment": None if augment is None else augment.get_state(),  # its torch and albumentations RNGs
    }


def set_rng_state(saved: dict[str, Any], generator: torch.Generator, augment: Augmenter | None) -> None:
    """Put back what `rng_state` took: the next epoch then shuffles, drops out and augments as it would have."""
    random.setstate(saved["python"])
    numpy_state = copy.deepcopy(saved["numpy"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(saved["torch"])
    generator.set_state(saved["shuffle"])
    if saved["cuda"]:
        torch.cuda.set_rng_state_all(saved["cuda"])
    if augment is not None:
        augment.set_state(saved["augment"])


class _Saver:
    """A fit's resumable state file: rank 0 reads and writes it, the other processes get it by broadcast.

    Every process sends rank 0 its RNG states (under torchrun each draws its own dropout masks), so a
    resumed process continues its own streams. Weights, optimizer and decisions are alike on every
    process; the restored history is rank 0's (the one written and logged). `path` None: nothing is
    saved or read.
    """

    def __init__(self, path: Path | None, generator: torch.Generator, augment: Augmenter | None) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = ""
        self.generator, self.augment = generator, augment

    def load(self, desc: str, total: int) -> dict[str, Any] | None:
        """The saved state if it belongs to this fit (same fingerprint); a found file gets one printed line."""
        if self.path is None:
            return None
        saved = self._read(desc) if world()[0] == 0 else None
        if saved is not None and world()[0] == 0:
            print(f"{desc}: resuming from epoch {len(saved['history']) + 1} of {total} ({self.path})", flush=True)
        return _from_rank0(saved)

    def _read(self, desc: str) -> dict[str, Any] | None:
        if not self.path or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
                raise ValueError("not a training state of this version")
        except Exception as err:  # truncated, corrupt, foreign: a cache miss, never a reason to stop
            print(f"{desc}: ignoring unreadable training state {self.path} ({type(err).__name__}): from the start")
            return None
        if saved.get("fingerprint") != self.fingerprint:
            print(f"{desc}: ignoring {self.path}: saved by another run (params, data or weights differ)")
            return None
        return saved

    def save(self, **progress: Any) -> None:
        """Write the state after an epoch, whole or not at all (temp file, then rename)."""
        if self.path is None:
            return
        rngs = _to_rank0(rng_state(self.generator, self.augment))
        if world()[0] != 0:
            return
        with atomic_path(self.path) as tmp, tmp.open("wb") as f:
            torch.save({"version": STATE_VERSION, "fingerprint": self.fingerprint, "rng": rngs, **progress}, f)

    def set_rng(self, rngs: list[dict[str, Any]]) -> None:
        set_rng_state(rngs[world()[0]], self.generator, self.augment)

    def drop(self) -> None:
        drop_state(self.path)


def drop_state(state: Path | None) -> None:
    """Remove a fit's state file (rank 0 owns it; a no-op elsewhere, or when there is none)."""
    if state is not None and world()[0] == 0:
        Path(state).unlink(missing_ok=True)


def _restore(saved: dict[str, Any], *, step: Step, plateau: Any, saver: _Saver) -> _Stopping:
    """Put a saved phase back: optimizer, scheduler, grad scaler and every RNG; its early-stopping state."""
    step.optimizer.load_state_dict(saved["optimizer"])
    plateau.load_state_dict(saved["scheduler"])
    step.scaler.load_state_dict(saved["scaler"])
    saver.set_rng(saved["rng"])
    best = saved["best"] if saved["best"] is not None else copy.deepcopy(saved["model"])
    low, tie = saved["best_score"]
    return _Stopping((low, tie), best, stale=saved["stale"], done=saved["done"])


def _to_rank0(obj: Any) -> list[Any]:
    """[every process's obj] on rank 0 (by rank); [] elsewhere. One process: [obj]."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _from_rank0(obj: Any) -> Any:
    """Rank 0's obj on every process."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _phase_inputs(
    model: Classifier,
    train: ImageSet,
    val: ImageSet,
    unfrozen: int,
    augment: Augmenter | None,
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
