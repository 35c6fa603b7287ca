"""Names of the runtime choices params.yaml makes: precision, device and test-time augmentation (torch-free)."""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"
Tta = Literal["none", "flip", "flip_translate"]
TTA_MODES: tuple[str, ...] = get_args(Tta)
TTA_HELP = "test-time augmentation: none | flip (mean with the mirror) | flip_translate (+ 1-px shifts)"
