"""The environment a result was made in: interpreter, CPU, the versions of the packages that decide the
figures, CUDA, and which lock file the venv was installed from.

`describe()` is flat `str -> str` so it can go to MLflow as tags and to `reports/` as JSON unchanged:

    python -m sstl.core.environment                           # print it
    python -m sstl.core.environment reports/environment.json  # write it (atomically)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from sstl.core.files import write_json

# the packages whose versions can change the metrics or how they are tracked
PACKAGES = ("torch", "torchvision", "numpy", "timm", "albumentations", "dvc", "mlflow")
LOCK_FILE = "requirements.lock"
NONE = "none"


def cpu_model(cpuinfo: Path | str = "/proc/cpuinfo") -> str:
    """The CPU's marketing name (`model name` in /proc/cpuinfo), else `platform.processor()`, else the
    machine type (never empty)."""
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str:
    """The installed distribution's version, `none` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return NONE


def lock_digest(lock: Path | str = LOCK_FILE) -> str:
    """First 12 hex digits of the lock file's sha256, `none` when there is no such file."""
    path = Path(lock)
    if not path.is_file():
        return NONE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _cuda() -> dict[str, str]:
    try:
        import torch
    except ImportError:
        return {"torch_cuda": NONE, "cuda_available": "false", "gpu": NONE, "gpu_count": "0"}
    available = torch.cuda.is_available()
    return {
        "torch": torch.__version__,  # with its build tag (2.14.1+cu130, 2.14.1+cpu); the metadata has none
        "torch_cuda": torch.version.cuda or NONE,  # the CUDA torch was built for; none for a CPU-only build
        "cuda_available": str(available).lower(),
        # the name only where CUDA is already up: asking would start a CUDA context on GPU 0 for CPU runs
        "gpu": torch.cuda.get_device_name(0) if available and torch.cuda.is_initialized() else NONE,
        "gpu_count": str(torch.cuda.device_count()),  # NVML: no CUDA context
    }


def blas() -> dict[str, str]:
    """The BLAS numpy and scipy compute with (the tune stage's Gaussian process runs on it): library,
    version, the kernel it picked for this CPU and its threads (threadpoolctl), and OPENBLAS_CORETYPE,
    which overrides the kernel. Another kernel moves a float's last bits, so a figure names it."""
    import numpy  # noqa: F401  (loads its BLAS, so that threadpoolctl sees it)
    from threadpoolctl import threadpool_info

    with contextlib.suppress(ImportError):
        import scipy.linalg  # noqa: F401  (skopt's GP: scipy may bring a BLAS of its own)
    libraries = sorted(
        {
            f"{lib.get('internal_api', '?')} {lib.get('version') or '?'} {lib.get('architecture') or '?'} "
            f"x{lib.get('num_threads', '?')}"
            for lib in threadpool_info()
            if lib.get("user_api") == "blas"
        }
    )
    return {"blas": "; ".join(libraries) or NONE, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE") or NONE}


def describe(lock: Path | str = LOCK_FILE) -> dict[str, str]:
    """Interpreter, platform, CPU, package versions, CUDA, BLAS and the lock file's digest (relative to the cwd)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count() or 0),
    }
    env.update({name: package_version(name) for name in PACKAGES})
    env.update(_cuda())
    env.update(blas())
    env["lock_sha256"] = lock_digest(lock)
    return env


def write_report(path: Path | str, lock: Path | str = LOCK_FILE) -> dict[str, str]:
    """Write `describe()` as JSON to `path` (whole or not at all) and return it."""
    env = describe(lock)
    write_json(path, env)
    return env


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_report(sys.argv[1])
    else:
        for key, value in describe().items():
            print(f"{key}: {value}")
