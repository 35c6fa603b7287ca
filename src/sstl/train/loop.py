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
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from tqdm import tqdm

from sstl.config.train import TrainConfig
from sstl.core.errors import DivergedError
from sstl.core.files import atomic_path
from sstl.data.dataset import ImageSet
from sstl.data.transforms import Augmenter
from sstl.models.classifier import Classifier, fit_whitening, model_digest, set_trainable, train_mode
from sstl.models.inference import infer
from sstl.runtime.device import Runtime
from sstl.runtime.distributed import agreed, all_finite, data_parallel, sync_buffers, world
from sstl.train.optim import Lookahead, class_weights, make_optimizer, make_scheduler
from sstl.train.resume import Optimisation, Saver, Stopping, fingerprint
from sstl.train.setup import FitSetup


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
        if not all_finite(loss):
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
    net: nn.Module, inputs: Inputs, labels: torch.Tensor, *, runtime: Runtime, batch_size: int = 256
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
    model: Classifier, images: torch.Tensor, *, runtime: Runtime, cache_dir: Path | None = None
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
    setup: FitSetup,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    state: Path | None = None,
    keep_state: bool = False,
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
    A network with a whitening layer (airbench) not fitted yet gets it from `train`'s first images.
    """
    runtime = setup.runtime
    seed_everything(setup.seed)
    fit_whitening(model, train.images)
    model.to(runtime.device)
    generator = torch.Generator().manual_seed(setup.seed)
    # resume, before the loop: the saved state of this very fit (same fingerprint), or None
    saver = Saver(state, generator, setup.augment, fingerprint(model, train, val, cfg, setup) if state else "")
    saved = saver.load(setup.desc, cfg.head_epochs + cfg.epochs)
    weight = class_weights(train.labels, setup.num_classes).to(runtime.device) if cfg.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    run = _Run(model, train, val, cfg, setup, loss_fn, generator, saver, on_epoch)
    if saved is not None:
        run.history, run.seen = list(saved["history"]), saved["seen"]
        run.start -= saved["seconds"]  # FitResult.seconds counts the killed runs' epochs too
    resumed = len(run.history)
    phases = [(0, cfg.head_epochs, cfg.lr), (min(cfg.unfreeze_blocks, len(model.blocks)), cfg.epochs, cfg.finetune_lr)]
    lead = world()[0] == 0
    with tqdm(
        total=cfg.head_epochs + cfg.epochs,
        initial=resumed,
        desc=setup.desc,
        unit="epoch",
        disable=None if lead else True,
    ) as run.bar:
        try:
            for phase, (unfrozen, epochs, lr) in enumerate(phases, start=1):
                if epochs == 0 or (saved is not None and phase < saved["phase"]):
                    continue  # nothing to train, or finished before the state was saved
                here = saved if saved is not None and phase == saved["phase"] else None
                if here is not None:  # before the phase's features: the backbone they come from
                    model.load_state_dict(here["model"])
                noise = setup.augment if unfrozen > 0 or setup.augment_head else None
                inputs = _phase_inputs(model, train, val, unfrozen, noise, runtime, setup.feature_cache)
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
class _Run:
    """What one fit's phases share: its fixed inputs and the running history."""

    model: Classifier
    train: ImageSet
    val: ImageSet
    cfg: TrainConfig
    setup: FitSetup
    loss_fn: nn.Module
    generator: torch.Generator
    saver: Saver
    on_epoch: Callable[[dict[str, float]], None] | None
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
        model, (net, _, val_in), cfg, runtime = self.model, inputs, self.cfg, self.setup.runtime
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

        step = Step(optimizer, self.loss_fn, runtime.grad_scaler(), runtime, after_step)
        opt = Optimisation(optimizer, scheduler, step.scaler, average)
        trained = data_parallel(net, runtime)
        if saved is None:
            first = evaluate_loss(net, val_in, self.val.labels, runtime=runtime) if phase > 1 else None
            stop = Stopping(_score(first, cfg.monitor) if first else (math.inf, math.inf), _copy(model))
        else:  # resume, before the loop (after the set-up: the saved RNG states count whatever it drew)
            stop = self.saver.restore_phase(saved, opt)
        while stop.done < epochs and (per_step or stop.stale < cfg.patience):
            row = self.epoch(phase, unfrozen=unfrozen, trained=trained, inputs=inputs, step=step)
            score = agreed(_score(row, cfg.monitor))  # every process takes rank 0's decisions
            if not per_step:
                scheduler.step(score[0])  # ReduceLROnPlateau: the metric
            improved = stop.update(score, model)
            # one save per epoch: everything the next one depends on
            self.saver.save_epoch(phase, stop, opt, model, best_is_model=improved or per_step, progress=self.progress())
        if average is not None:
            average.finish()
        if not per_step:
            model.load_state_dict(stop.best_state)

    def progress(self) -> dict[str, Any]:
        """The run's side of a saved state: the history so far, images seen, wall seconds."""
        return {"history": self.history, "seen": self.seen, "seconds": self.elapsed()}

    def epoch(
        self, phase: int, *, unfrozen: int, trained: nn.Module, inputs: tuple[nn.Module, Inputs, Inputs], step: Step
    ) -> dict[str, float]:
        """Train one epoch, validate, append the history row and report it."""
        net, train_in, val_in = inputs
        t0, number = time.perf_counter(), len(self.history) + 1
        row = {"phase": phase, "lr": step.optimizer.param_groups[0]["lr"]}
        train_mode(self.model, unfrozen, freeze_bn=self.cfg.freeze_bn)
        row |= train_epoch(
            trained,
            train_in,
            self.train.labels,
            step,
            batch_size=self.cfg.batch_size,
            generator=self.generator,
            epoch=number,
            targets=self.setup.targets,
        )
        sync_buffers(self.model)
        row |= evaluate_loss(net, val_in, self.val.labels, runtime=self.setup.runtime)
        row |= {"epoch": number, "seconds": time.perf_counter() - t0}
        self.seen += len(self.train)
        self.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(row)
        self.bar.update(1)
        return row


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


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


def _score(row: dict[str, float], monitor: str) -> tuple[float, float]:
    """Lower is better: (val loss, 0), or (-val accuracy, val loss) so that ties in accuracy go to the lower loss."""
    return (row["val_loss"], 0.0) if monitor == "val_loss" else (-row["val_acc"], row["val_loss"])
