"""Where and how tensors are computed, decided once per stage: device and numeric precision.

A `Runtime` is built from the params (`device`, `precision.train` / `precision.infer`) at the top of a
stage and passed explicitly to everything that trains or infers, so no function guesses a device
or reads a precision string. Precision covers forward passes only (autocast): weights, optimizer
state, losses and softmax stay fp32.

- fp32: plain float32 everywhere.
- bf16: autocast to bfloat16 (CPU with AVX512-BF16/AMX, recent GPUs). About 2x faster on such CPUs
  (reports/benchmarks/throughput.md); emulated and slower elsewhere, and sstl warns.
- fp16: autocast to float16 with a gradient scaler (CUDA only; its range is too small without one).
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from sstl.config.runtime import DEVICE_HELP, PRECISIONS, Precision
from sstl.core.errors import SstlError

EMULATED = (
    "precision: bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and slower; "
    "set precision.train and precision.infer to fp32"
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); False when it cannot be asked."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up with care
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda if present, else mps, else cpu; an explicit device must exist here."""
    spec = spec.strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
        spec = "cuda"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SstlError(f"device {spec!r} is not a device: use {DEVICE_HELP}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SstlError(f"device {spec!r}: no CUDA GPU is visible here: set device to auto or cpu")
        index = 0 if device.index is None else device.index
        if device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            index = int(os.environ["LOCAL_RANK"])
        if index >= count:
            raise SstlError(f"device {spec!r}: only {count} CUDA GPU(s) here (cuda:0..cuda:{count - 1})")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SstlError(f"device {spec!r}: MPS (Apple GPU) is not available here: set device to auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SstlError(f"device {spec!r} is not supported: use {DEVICE_HELP}")
    return device


@dataclass(frozen=True)
class Runtime:
    """The device and precision of one stage's computation; built once, passed everywhere."""

    device: torch.device
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SstlError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device.type == "cpu":
            raise SstlError("precision fp16 needs a GPU: on the CPU use bf16 (native on recent CPUs) or fp32")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager[object]:
        """The context of a forward pass: a no-op for fp32, autocast to bf16/fp16 otherwise."""
        if self.precision == "fp32":
            return nullcontext()
        if self.precision == "bf16" and self.device.type == "cpu" and not native_bf16():
            warnings.warn(EMULATED, stacklevel=2)  # shown once per call site (Python's default filter)
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its 5-bit exponent underflows small gradients); disabled otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """Host tensor -> this device; pinned and asynchronous on CUDA (the copy overlaps compute)."""
        if not self.cuda:
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def describe(self) -> dict[str, str]:
        """What MLflow and checkpoints record: the resolved device (with its model) and precision."""
        name = torch.cuda.get_device_name(self.device) if self.cuda else self.device.type
        return {"device": str(self.device), "device_name": name, "precision": self.precision}


def make_runtime(device: str, precision: Precision) -> Runtime:
    """Resolve `device` and set the deterministic switches, so the same seed gives the same metrics."""
    runtime = Runtime(resolve_device(device), precision)
    if runtime.cuda:
        # cuBLAS needs a fixed workspace for reproducible matrix products; cuDNN must not autotune.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return runtime


CPU = Runtime(torch.device("cpu"))  # the default of library functions: fp32 on the CPU
