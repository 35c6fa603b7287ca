"""Numeric precision of forward passes: fp32, or bf16 autocast (mixed precision).

bf16 autocast runs convolutions and matrix products in bfloat16 with fp32 accumulation, while
weights, optimizer state, losses and softmax stay fp32. On CPUs with native bf16 (AVX512-BF16 or
AMX) it is about 2x faster in training and inference (reports/benchmarks/throughput.md); elsewhere
bf16 is emulated and slower, and `autocast` warns.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
EMULATED = (
    "precision: bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and slower; "
    "set precision.train and precision.infer to fp32"
)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); False when it cannot be asked."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up with care
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast(precision: Precision) -> torch.autocast:
    """The context for a forward pass (and its loss): a no-op for fp32, bf16 autocast on CPU for bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not native_bf16():
        warnings.warn(EMULATED, stacklevel=2)  # shown once per call site (Python's default filter)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
