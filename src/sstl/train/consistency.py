"""The consistency student (`student.method: fixmatch`): FixMatch with FlexMatch thresholds and
distribution alignment, trained on cached activations of the backbone's frozen bottom.

Why cached: on a CPU the bottom of an ImageNet backbone is most of the compute and, frozen, gives the
same activations every epoch. Computed once per view (2 weak views of every photo: as it is and
mirrored; `strong_views` strongly augmented views of every unlabelled photo), the top `unfreeze_blocks`
groups and the head then see every view of the pool for many epochs in the time one epoch of the
whole network would take.

One step, B labelled rows and mu*B unlabelled ones, one forward pass over all three parts:
  loss = CE(labelled weak view, its label)                  (smoothed by the schedule's label_smoothing)
       + weight  * mean(mask * CE(strong view, argmax q))     q: the weak view's prediction, aligned, no grad
                                                              (`temperature` T > 0: q^(1/T), renormalised)
       + distill * CE(strong view, the teacher's soft target)  (the rows the pseudolabel stage selected)
  mask: max q >= threshold * M(beta_c), M(b) = b / (2 - b) (FlexMatch); beta_c is the share of the pool
  confidently predicted as c over the largest of those shares and the not yet confident rows, so every
  threshold starts low and rises as the class is learnt.
Alignment (ReMixMatch): q = p * prior / mean(p), renormalised; prior is the starting model's mean
prediction over the pool (the probe head's, when `probe_head`), mean(p) a running mean of recent batches.
With `ema` (mean teacher), q comes from a running average of the trained weights, updated every step,
and that average is the model kept: targets that drift less, an end point that is a mean of the last
steps rather than the last one.
With `pseudo_head` (DST, Wang et al. 2022) both strong-view terms go through a second head on the same
features, started as the first and dropped at the end: the model's head, which makes the targets, learns
from the labels alone.
The LR decays as cos(7 pi t / 16 T) over the T steps (FixMatch); the end point is kept (the last weights,
or with `ema` their average): a val set of a few dozen photos cannot pick an epoch.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sstl.config.train import ConsistencyConfig, TrainConfig
from sstl.core.errors import DivergedError, SstlError
from sstl.data.dataset import ImageSet
from sstl.data.transforms import Augmenter
from sstl.models.classifier import Classifier, set_trainable, stage_module, train_mode
from sstl.runtime.device import Runtime
from sstl.runtime.distributed import world
from sstl.train.loop import FitResult, seed_everything
from sstl.train.resume import Saver, data_digest, fingerprint, set_rng_state
from sstl.train.setup import FitSetup

BATCH = 64  # images per forward pass of the bottom while the views are computed
DA_MOMENTUM = 0.999  # running mean of the weak predictions (ReMixMatch's)


class _Stop(Exception):
    """Raised by the bottom's hook once the activations it wants are there: the rest is not computed."""


class Split:
    """`model`'s backbone cut before its top `top` groups (`model.blocks`, stem first).

    The cut is the largest module that starts the first top group and holds nothing of the groups
    below it (`blocks.5`, a whole stage, for EfficientNet's group 6), so that a residual never reaches
    across it. `bottom` maps preprocessed images to the activations entering that module; `pooled` maps
    such activations to the backbone's pooled features, by a forward pass whose input batch is empty
    until the cut, where the hook puts the activations in: no family-specific forward is written.
    """

    def __init__(self, model: Classifier, top: int) -> None:
        n = len(model.blocks)
        if not 0 < top < n:
            raise SstlError(
                f"student.unfreeze_blocks is {top}: the consistency student trains the top 1 to {n - 1} of the "
                f"{n} groups of its backbone, on the activations of the frozen rest: set it in that range"
            )
        self.model = model
        self.entry = stage_module(model.backbone, list(model.blocks), n - top)
        self._side, self._shape = 0, tuple[int, ...]()  # the input's side and the cut's (C, h, w): set by bottom

    def bottom(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> the activations entering the cut (inference): (N, C, h, w);
        with taps below the cut, each row flattened and followed by those taps' statistics, (N, C h w + S)."""
        caught: list[torch.Tensor] = []

        def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
            caught.append(args[0])
            raise _Stop

        handle = self.entry.register_forward_pre_hook(grab)
        try:
            with self.model.tapped() as tapped:  # the taps below the cut: those above never run
                self.model.backbone(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not caught:
            raise SstlError("the backbone never reached its top groups: it cannot train as a consistency student")
        self._side, self._shape = int(x.shape[-1]), tuple(caught[0].shape[1:])
        if not tapped:
            return caught[0]
        act = caught[0]
        return torch.cat([act.flatten(1), *(s.to(act.dtype) for s in self.model.tap_statistics(tapped))], 1)

    def pooled(self, act: torch.Tensor) -> torch.Tensor:
        """What `bottom` gives (N, ...) -> the model's features (N, D): pooled, and its taps'."""
        given = None
        if act.dim() == 2:  # packed: the activations, then the statistics of the taps below the cut
            size = math.prod(self._shape)
            act, given = act[:, :size].reshape(-1, *self._shape), act[:, size:]

        def put(_module: nn.Module, _args: tuple[Any, ...]) -> tuple[torch.Tensor]:
            return (act,)

        handle = self.entry.register_forward_pre_hook(put)
        try:
            empty = act.new_zeros((0, 3, self._side, self._side))  # the bottom computes nothing
            return self.model.features(empty, given=given)  # the taps above the cut from `act`
        finally:
            handle.remove()

    def like(self, other: Split) -> None:
        """Read what `other.bottom` gave (the mean teacher's twin reads the student's cached views)."""
        self._side, self._shape = other._side, other._shape


class Top(nn.Module):
    """The trained part: activations at the cut -> the top groups -> pooled features -> head -> logits."""

    def __init__(self, split: Split) -> None:
        super().__init__()
        self.split = split
        self.model = split.model

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.split.pooled(act))


@torch.inference_mode()
def views(
    split: Split,
    images: torch.Tensor,
    *,
    runtime: Runtime,
    flip: bool,
    strong: int = 0,
    augment: Augmenter | None = None,
    desc: str = "views",
) -> torch.Tensor:
    """Bottom activations of uint8 images (N, H, W, 3): (W + strong, N, ...), the W weak views (as they
    are; mirrored too with `flip`), then `strong` views under `augment` (its seeded streams: the same
    views every run)."""
    model = split.model
    model.eval()
    out: torch.Tensor | None = None
    n = len(images)
    for start in tqdm(range(0, n, BATCH), desc=desc, unit="batch", disable=None):
        x = images[start : start + BATCH]
        batch = [x, x.flip(2)] if flip else [x]
        if strong:
            assert augment is not None
            batch += [augment(x) for _ in range(strong)]
        for v, xv in enumerate(batch):
            with runtime.autocast():
                act = split.bottom(model.preprocess(runtime.put(xv)))
            if out is None:
                out = torch.empty((len(batch), n, *act.shape[1:]), dtype=act.dtype)
            out[v, start : start + len(x)] = act.cpu()
    if out is None:
        raise SstlError(f"{desc}: no images")
    return out


Screen = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Pool:
    """The unlabelled photos the consistency loss trains on, and the teacher's soft targets of those the
    pseudolabel stage selected (`soft` (N, C); `chosen` (N,) bool marks them).

    `screen`: the starting backbone's pooled features of the pool (N, D), the labelled rows and val ->
    (N,) bool, the pool photos of a known class; the others never enter the loss (None: all do)."""

    images: ImageSet
    soft: torch.Tensor
    chosen: torch.Tensor
    screen: Screen | None = None


class Targets:
    """The weak views' predictions made targets: aligned to the pool prior (ReMixMatch), masked by
    FlexMatch's class-adaptive thresholds. What it keeps (each pool row's confident class, the running
    mean prediction) is part of an epoch's resumable state."""

    def __init__(self, cfg: ConsistencyConfig, prior: torch.Tensor, pool_size: int, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.prior = runtime.put(prior)  # (C,) the starting model's mean prediction over the pool
        self.mean = self.prior.clone()  # (C,) running mean of recent weak predictions
        self.learnt = torch.full((pool_size,), -1, dtype=torch.int64)  # each pool row's confident class, or -1

    def __call__(self, weak_logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) logits of the weak views of `rows` (positions in the screened pool) -> (targets: hard (B,),
        or with `temperature` sharpened distributions (B, C); mask (B,) of 0/1)."""
        cfg = self.cfg
        p = weak_logits.detach().softmax(1)
        if cfg.align:  # towards the prior, away from what the model over-predicts lately
            self.mean.mul_(DA_MOMENTUM).add_(p.mean(0), alpha=1 - DA_MOMENTUM)
            p = p * self.prior / self.mean
            p = p / p.sum(1, keepdim=True)
        conf, guess = p.max(1)
        tau = torch.full_like(self.prior, cfg.threshold)
        if cfg.flex:
            sure = conf.cpu() >= cfg.threshold
            self.learnt[rows[sure]] = guess.cpu()[sure]
            n = len(self.learnt)
            effect = torch.bincount(self.learnt[self.learnt >= 0], minlength=len(tau)).float()
            unused = float((self.learnt < 0).sum())
            if cfg.flex_prior:  # per class: the share of its expected photos learnt, not their count
                effect, unused = effect / (self.prior.cpu() * n).clamp(min=1.0), unused / n
            beta = effect / max(float(effect.max()), unused, 1e-12)  # 0 for all while nothing is confident
            tau = tau * self.runtime.put(beta / (2 - beta))  # FlexMatch's convex mapping
        mask = (conf >= tau[guess]).float()
        if cfg.temperature > 0:  # the weak view's ranking of the other classes kept, its confidence sharpened
            sharp = p ** (1 / cfg.temperature)
            return sharp / sharp.sum(1, keepdim=True), mask
        return guess, mask

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"learnt": self.learnt.clone(), "mean": self.mean.cpu().clone()}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        self.learnt, self.mean = saved["learnt"].clone(), self.runtime.put(saved["mean"].clone())


def fit_consistency(
    model: Classifier,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    setup: FitSetup,
    *,
    pool: Pool,
    consistency: ConsistencyConfig,
    head_init: Callable[[Classifier, Runtime], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    state: Path | None = None,
    keep_state: bool = False,
) -> FitResult:
    """Train `model`'s top `cfg.unfreeze_blocks` groups and head with the consistency loss for
    `cfg.epochs` passes over the pool; `train` are the labelled rows. Same contract as `loop.fit`:
    the history per epoch, a per-epoch resumable `state`, a non-finite loss stops with one line."""
    if world()[1] > 1:
        raise SstlError("student.method fixmatch trains in one process: run the student stage without torchrun")
    runtime, ccfg = setup.runtime, consistency
    seed_everything(setup.seed)
    model.to(runtime.device)
    split = Split(model, cfg.unfreeze_blocks)
    if head_init is not None:
        head_init(model, runtime)  # before anything reads the head: the prior below is the starting model's
    _check_cut(split, val.images[:4], runtime)
    weak, flip = (2 if ccfg.flip else 1), ccfg.flip
    pool_v = views(
        split, pool.images.images, runtime=runtime, flip=flip, strong=ccfg.strong_views, augment=setup.augment,
        desc="pool views",
    )  # fmt: skip
    lab_v = views(split, train.images, runtime=runtime, flip=flip, desc="labelled views")
    val_v = views(split, val.images, runtime=runtime, flip=False, desc="val views")[0]
    net = Top(split)
    kept = torch.arange(len(pool.images))  # (K,) the pool rows the loss sees: all, or those screened in
    if pool.screen is not None:
        feats = [_features(net, acts, runtime) for acts in (pool_v[0], lab_v[0], val_v)]
        kept = pool.screen(*feats).nonzero().flatten()
        if not len(kept):
            raise SstlError("every unlabelled photo was screened out as of no known class: lower ood_quantile")
    prior = _mean_prediction(net, pool_v[0][kept], runtime, setup.num_classes)
    generator = torch.Generator().manual_seed(setup.seed)
    saver = Saver(state, generator, None, _fingerprint(model, train, val, cfg, setup, pool, ccfg) if state else "")
    set_trainable(model, cfg.unfreeze_blocks)
    head = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    twin, averaged, judge = None, list[torch.Tensor](), net  # judge: the network that makes the targets and is kept
    if ccfg.ema > 0:  # mean teacher: a running average of the trained weights
        twin = copy.deepcopy(model).requires_grad_(False).eval()
        averaged = [q for q, p in zip(twin.parameters(), model.parameters(), strict=True) if p.requires_grad]
        judge = Top(Split(twin, cfg.unfreeze_blocks))
        judge.split.like(split)
    # DST's pseudo head: the strong views' losses train it, not the model's head (None: they train that one)
    aux = copy.deepcopy(model.head).requires_grad_(True) if ccfg.pseudo_head else None
    groups = [
        {"params": [p for p in trainable if id(p) not in head], "lr": cfg.finetune_lr},
        {"params": [p for p in trainable if id(p) in head] + ([] if aux is None else list(aux.parameters())),
         "lr": cfg.lr},
    ]  # fmt: skip
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    u = ccfg.unlabeled_ratio * cfg.batch_size
    steps = math.ceil(len(kept) / u)
    total = cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: math.cos(7 * math.pi * t / (16 * total)))
    targets = Targets(ccfg, prior, len(kept), runtime)
    scaler = runtime.grad_scaler()  # fp16 on a GPU: the loss scaled; a no-op otherwise
    history: list[dict[str, float]] = []
    seen, start = 0, time.perf_counter()
    saved = saver.load(setup.desc, cfg.epochs)
    if saved is not None:  # resume, before the loop
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        targets.load_state_dict(saved["targets"])
        if twin is not None:
            twin.load_state_dict(saved["ema"])
        if aux is not None:
            aux.load_state_dict(saved["aux"])
        history, seen = list(saved["history"]), saved["seen"]
        start -= saved["seconds"]
        set_rng_state(saved["rng"][0], generator, None)
    resumed = len(history)
    with tqdm(total=cfg.epochs, initial=resumed, desc=setup.desc, unit="epoch", disable=None) as bar:
        for epoch in range(resumed + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_mode(model, cfg.unfreeze_blocks, freeze_bn=cfg.freeze_bn)
            if aux is not None:  # outside the model: its dropout set by hand, as train_mode sets the head's
                aux.train()
            sums = dict.fromkeys(("loss", "labelled", "unlabelled", "distill", "mask", "correct"), 0.0)
            order = torch.randperm(len(kept), generator=generator)
            labelled = _cycle(len(train), cfg.batch_size * steps, generator)
            for s in range(steps):
                at = order[s * u : (s + 1) * u]  # (U,) positions in `kept`, (B,) labelled rows; each a random view
                ui = kept[at]  # (U,) pool rows
                li = labelled[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                x_l = lab_v[torch.randint(weak, (len(li),), generator=generator), li]
                x_w = pool_v[torch.randint(weak, (len(ui),), generator=generator), ui]
                x_s = pool_v[weak + torch.randint(ccfg.strong_views, (len(ui),), generator=generator), ui]
                with runtime.autocast():  # one pass over the three parts: BatchNorm sees them together
                    if aux is not None:  # the labelled and weak rows through the head, the strong ones through aux
                        parts = [x_l, x_w, x_s] if twin is None else [x_l, x_s]
                        f = split.pooled(runtime.put(torch.cat(parts))).split([len(x) for x in parts])
                        l_l, l_s = model.head(f[0]).float(), aux(f[-1]).float()
                        with torch.no_grad():
                            l_w = (model.head(f[1]) if twin is None else judge(runtime.put(x_w))).float()
                    elif twin is None:
                        logits = net(runtime.put(torch.cat([x_l, x_w, x_s]))).float()
                        l_l, l_w, l_s = logits.split([len(li), len(ui), len(ui)])
                    else:  # the weak views' targets from the average, no gradient
                        l_l, l_s = net(runtime.put(torch.cat([x_l, x_s]))).float().split([len(li), len(ui)])
                        with torch.no_grad():
                            l_w = judge(runtime.put(x_w)).float()
                y = runtime.put(train.labels[li])
                target, mask = targets(l_w, at)
                loss_l = F.cross_entropy(l_l, y, label_smoothing=cfg.label_smoothing)
                loss_u = (F.cross_entropy(l_s, target, reduction="none") * mask).mean()
                loss_d = torch.zeros((), device=loss_l.device)
                chosen = pool.chosen[ui]
                if ccfg.distill > 0 and bool(chosen.any()):  # the teacher's soft pseudo-labels, where it made one
                    loss_d = F.cross_entropy(l_s[runtime.put(chosen)], runtime.put(pool.soft[ui[chosen]]))
                loss = loss_l + ccfg.weight * loss_u + ccfg.distill * loss_d
                if not bool(torch.isfinite(loss)):
                    lr = optimizer.param_groups[0]["lr"]
                    where = f"at epoch {epoch}, batch {s + 1} (lr {lr:g})"
                    raise DivergedError(f"training diverged: loss {loss.item()} {where}: lower the lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if twin is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(averaged, [p.detach() for p in trainable], 1 - ccfg.ema)
                        for twin_buffer, live in zip(twin.buffers(), model.buffers(), strict=True):
                            twin_buffer.copy_(live)  # BatchNorm statistics: the trained network's
                for key, value in (("loss", loss), ("labelled", loss_l), ("unlabelled", loss_u), ("distill", loss_d)):
                    sums[key] += float(value.detach())
                sums["mask"] += float(mask.mean())
                sums["correct"] += float((l_l.argmax(1) == y).float().mean())
            row: dict[str, float] = {"phase": 2, "lr": optimizer.param_groups[0]["lr"]}
            row |= {"train_loss": sums["loss"] / steps, "train_acc": sums["correct"] / steps}
            row |= {f"{k}_loss": sums[k] / steps for k in ("labelled", "unlabelled", "distill")}
            row["mask_rate"] = sums["mask"] / steps
            row |= _evaluate(judge, val_v, val.labels, runtime)
            row |= {"epoch": epoch, "seconds": time.perf_counter() - t0}
            seen += steps * (cfg.batch_size + 2 * u)
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            bar.update(1)
            saver.save(  # one save per epoch: everything the next one depends on
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                targets=targets.state_dict(),
                ema=None if twin is None else twin.state_dict(),
                aux=None if aux is None else aux.state_dict(),
                history=history,
                seen=seen,
                seconds=time.perf_counter() - start,
            )
    if twin is not None:  # the average is the model kept
        model.load_state_dict(twin.state_dict())
    final = _evaluate(net, val_v, val.labels, runtime)
    if not keep_state:
        saver.drop()
    return FitResult(history, final["val_loss"], final["val_acc"], time.perf_counter() - start, seen, resumed)


@torch.inference_mode()
def _check_cut(split: Split, images: torch.Tensor, runtime: Runtime) -> None:
    """The cut network computes what the whole one does, or one line saying this backbone cannot be cut."""
    model = split.model
    model.eval()
    x = model.preprocess(runtime.put(images))
    whole, cut = model.features(x), split.pooled(split.bottom(x))
    if not torch.allclose(whole, cut, rtol=1e-4, atol=1e-5):
        raise SstlError(
            f"{type(model.backbone).__name__}'s forward does not run its groups in sequence, so its top cannot "
            "train on cached activations: use student.method noisy for this arch"
        )


def _cycle(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`length` row indices of 0..n-1: shuffled passes one after another (every labelled row as often)."""
    passes = -(-length // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])[:length]


@torch.inference_mode()
def _mean_prediction(net: Top, acts: torch.Tensor, runtime: Runtime, c: int) -> torch.Tensor:
    net.model.eval()
    total = torch.zeros(c)
    for chunk in acts.split(256):
        with runtime.autocast():
            total += net(runtime.put(chunk)).float().softmax(1).sum(0).cpu()
    return total / len(acts)


@torch.inference_mode()
def _features(net: Top, acts: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Activations at the cut (N, ...) -> the pooled backbone features (N, D) float32, as it starts."""
    net.model.eval()
    out = []
    for chunk in acts.split(256):
        with runtime.autocast():
            out.append(net.split.pooled(runtime.put(chunk)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def _evaluate(net: Top, acts: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> dict[str, float]:
    net.model.eval()
    loss, correct = 0.0, 0
    for chunk, y in zip(acts.split(256), labels.split(256), strict=True):
        with runtime.autocast():
            logits = net(runtime.put(chunk)).float()
        y = runtime.put(y)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"val_loss": loss / len(labels), "val_acc": correct / len(labels)}


def _fingerprint(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    setup: FitSetup,
    pool: Pool,
    ccfg: ConsistencyConfig,
) -> str:
    """loop's fingerprint, plus what only this fit depends on: the pool, its soft targets, the method's keys."""
    h = hashlib.sha256(fingerprint(model, train, val, cfg, setup).encode())
    h.update(data_digest(pool.images.images, pool.images.labels).encode())
    h.update(pool.soft.float().contiguous().numpy().tobytes() + pool.chosen.numpy().tobytes())
    h.update(ccfg.model_dump_json().encode())
    return h.hexdigest()
