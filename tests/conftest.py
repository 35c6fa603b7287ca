"""Shared fixtures: an isolated MLflow store per test session, and the project's root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

# One thread per pytest-xdist worker, and per process it starts (DVC stages and servers inherit the
# environment; torch is not imported yet): `-n auto` already runs a worker per core, and each worker's
# stages running a thread per core as well oversubscribed the CPU, the suite 25% slower on 2 cores
# (1,066 s against 775 s, 2026-12-07). A thread count set by the caller wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]  # the classes of the `checkpoint` fixture
T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules holding slow end-to-end tests first, each kept whole (a stable sort keeps every
    module's own order, so module fixtures are built once): under `-n` (pyproject's addopts) each starts
    at once on a worker of its own and the quick modules fill in around them, so the run lasts about as
    long as its longest module, not two of them in a row."""
    slow = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def _no_cached_proxy() -> Any:
    """urllib builds its global opener, proxies read from the environment, on the first urlopen and keeps
    it: a test that sets a dead proxy (no network, as torchvision's download would use) must not leave
    every later request to a server on 127.0.0.1 going to that proxy."""
    yield
    urllib.request.install_opener(None)  # the next urlopen builds a new one from the environment as it is


@pytest.fixture(autouse=True, scope="session")
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    # never write into the developer's own mlflow.db
    store = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class mobilenet_v3_small checkpoint at 16 px: for plumbing (CLI, queue), not accuracy."""
    from sstl.config.model import ModelConfig
    from sstl.models.checkpoint import save_checkpoint
    from sstl.models.factory import create_model

    path = tmp_path_factory.mktemp("model") / "model.pt"
    cfg = ModelConfig(arch="mobilenet_v3_small", head_layers=0)
    save_checkpoint(path, create_model(cfg, len(CLASSES)).eval(), cfg, CLASSES, image_size=16)
    return path


def finishes(fn: Callable[[], T], seconds: float = 60) -> T:
    """fn() run in a thread that must end within `seconds`: a FIFO opened for reading would block."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the test's thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s (a FIFO opened for reading?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def unprivileged() -> list[str] | None:
    """A command prefix under which chmod 000 really denies reading: [] for a normal user; for root
    (who reads anything), setpriv without the capabilities that let root bypass permissions; None when
    neither works here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        res = subprocess.run([*prefix, "cat", str(probe)], capture_output=True)
    return prefix if res.returncode != 0 else None
