"""Bit-exact resume of a fit: the fingerprint of what decides every step, every RNG, and the per-epoch state file.

The loop calls `Saver.load` once before its first epoch (`restore_phase` puts the phase it was in back)
and `Saver.save_epoch` once after each; a process killed at any moment resumes after its last finished
epoch and ends with the same weights, bit for bit. Everything a state holds is decided here: the
weights, the early-stopping bookkeeping (`Stopping`), the optimiser, schedule, grad scaler and
Lookahead (`Optimisation`), the history and every RNG.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sstl.config.train import TrainConfig
from sstl.core.files import atomic_path
from sstl.data.dataset import ImageSet
from sstl.data.transforms import Augmenter
from sstl.models.classifier import model_digest
from sstl.runtime.distributed import from_rank0, to_rank0, world
from sstl.train.optim import Lookahead
from sstl.train.setup import FitSetup

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
    setup: FitSetup,
) -> str:
    """sha256 of what decides a fit's every step: a state saved under another one is not resumed.

    The schedule, seed, starting weights, data, augmentation (and its seeded RNGs), device, precision,
    world size and torch version: a state from any other fit would not continue this one bit for bit.
    """
    h = hashlib.sha256()
    augment, runtime = setup.augment, setup.runtime
    parts = (
        cfg.model_dump_json(),
        setup.seed,
        setup.num_classes,
        model_digest(model),
        None if augment is None else augment.describe(),  # its config, seed and RNG position
        setup.augment_head,
        runtime.precision,
        runtime.describe()["device_name"],
        world()[1],
        torch.__version__,
    )
    for part in parts:
        h.update(f"{part}\n".encode())
    for data in (train, val):
        h.update(data_digest(data.images, data.labels).encode())
    if setup.targets is not None:
        h.update(hashlib.sha256(setup.targets.float().contiguous().numpy().tobytes()).digest())
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


@dataclass
class Stopping:
    """One phase's early stopping: the best score and weights so far, epochs run and epochs without gain."""

    best_score: tuple[float, float]  # lower is better (the loop's score: val loss, or -val accuracy)
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
class Optimisation:
    """A phase's optimiser, LR schedule, grad scaler and Lookahead average: what a state holds besides weights."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    average: Lookahead | None

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lookahead": None if self.average is None else self.average.state_dict(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.average is not None:
            self.average.load_state_dict(saved["lookahead"])


class Saver:
    """A fit's resumable state file: rank 0 reads and writes it, the other processes get it by broadcast.

    Every process sends rank 0 its RNG states (under torchrun each draws its own dropout masks), so a
    resumed process continues its own streams. Weights, optimizer and decisions are alike on every
    process; the restored history is rank 0's (the one written and logged). `path` None: nothing is
    saved or read.
    """

    def __init__(
        self, path: Path | None, generator: torch.Generator, augment: Augmenter | None, fingerprint: str = ""
    ) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self.generator, self.augment = generator, augment

    def load(self, desc: str, total: int) -> dict[str, Any] | None:
        """The saved state if it belongs to this fit (same fingerprint); a found file gets one printed line."""
        if self.path is None:
            return None
        saved = self._read(desc) if world()[0] == 0 else None
        if saved is not None and world()[0] == 0:
            print(f"{desc}: resuming from epoch {len(saved['history']) + 1} of {total} ({self.path})", flush=True)
        return from_rank0(saved)

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
        rngs = to_rank0(rng_state(self.generator, self.augment))
        if world()[0] != 0:
            return
        with atomic_path(self.path) as tmp, tmp.open("wb") as f:
            torch.save({"version": STATE_VERSION, "fingerprint": self.fingerprint, "rng": rngs, **progress}, f)

    def save_epoch(
        self,
        phase: int,
        stop: Stopping,
        opt: Optimisation,
        model: nn.Module,
        *,
        best_is_model: bool,
        progress: dict[str, Any],
    ) -> None:
        """After an epoch: everything the next one depends on (the RNGs are read here)."""
        self.save(
            phase=phase,
            done=stop.done,
            stale=stop.stale,
            best_score=list(stop.best_score),
            model=model.state_dict(),
            # None: the best is `model` (half the bytes), or unused (a linear schedule keeps the last)
            best=None if best_is_model else stop.best_state,
            **opt.state_dict(),
            **progress,
        )

    def restore_phase(self, saved: dict[str, Any], opt: Optimisation) -> Stopping:
        """Put a saved phase back: optimisation and every RNG; its early-stopping state."""
        opt.load_state_dict(saved)
        set_rng_state(saved["rng"][world()[0]], self.generator, self.augment)
        best = saved["best"] if saved["best"] is not None else copy.deepcopy(saved["model"])
        low, tie = saved["best_score"]
        return Stopping((low, tie), best, stale=saved["stale"], done=saved["done"])

    def drop(self) -> None:
        drop_state(self.path)


def drop_state(state: Path | None) -> None:
    """Remove a fit's state file (rank 0 owns it; a no-op elsewhere, or when there is none)."""
    if state is not None and world()[0] == 0:
        Path(state).unlink(missing_ok=True)
