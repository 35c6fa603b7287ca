"""FitSetup: what one fit runs with besides its data and schedule (the loop and resume both read it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sstl.data.transforms import Augmenter
from sstl.runtime.device import Runtime


@dataclass(frozen=True, kw_only=True)
class FitSetup:
    """What a fit runs with besides its data and schedule, every field by keyword: the runtime is always
    given (no function guesses a device), the rest says how the training rows are fed."""

    num_classes: int
    seed: int
    runtime: Runtime
    augment: Augmenter | None = None  # per-image host + batched device augmentation of the training images
    augment_head: bool = True  # False: phase 1 (head only) trains unaugmented, on cached backbone features
    targets: torch.Tensor | None = None  # soft targets (N, C) for the training rows (see train_epoch); None: labels
    feature_cache: Path | None = None  # folder for phase 1's backbone features (see `features`)
    desc: str = "train"  # the progress bar's and the resume messages' label
