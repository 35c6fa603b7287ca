"""sstl.environment: what a figure records about the environment it was made in."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from sstl.core import environment


def test_versions_are_the_installed_ones() -> None:
    env = environment.describe()
    assert env["torch"] == torch.__version__
    assert env["numpy"] == numpy.__version__
    assert env["python"] == platform.python_version()
    for name in environment.PACKAGES:  # all installed in the project's venv
        assert env[name] != environment.NONE, name
    assert env["torch_cuda"] == (torch.version.cuda or "none")
    assert env["cuda_available"] == str(torch.cuda.is_available()).lower()
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in env.items())  # usable as MLflow tags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_cpu_model_on_linux() -> None:
    env = environment.describe()
    assert env["cpu"] and env["cpu"] != "unknown"
    assert int(env["cpu_count"]) >= 1


def test_cpu_model_from_cpuinfo_and_fallback(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    assert environment.cpu_model(cpuinfo) == "AMD EPYC 9R14"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. some ARM kernels: no model name
    assert environment.cpu_model(cpuinfo) == (platform.processor() or platform.machine() or "unknown")
    assert environment.cpu_model(tmp_path / "missing")


def test_lock_digest_follows_the_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert environment.describe()["lock_sha256"] == "none"
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.14.1\n")
    first = environment.describe()["lock_sha256"]
    assert len(first) == 12 and int(first, 16) >= 0
    lock.write_text("torch==2.15.0\n")
    second = environment.describe()["lock_sha256"]
    assert second != first
    assert environment.lock_digest(lock) == second


def test_write_report(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "environment.json"
    env = environment.write_report(out, lock=tmp_path / "no.lock")
    assert json.loads(out.read_text()) == env
    assert env["lock_sha256"] == "none"
    assert not list(out.parent.glob(".*.tmp"))  # written through a temp file, nothing left over


def test_repo_lock_pins_what_is_installed() -> None:
    # the committed lock is what CI installs: torch and torchvision in it are the ones running here
    lock = Path(__file__).resolve().parents[1] / environment.LOCK_FILE
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", lock.read_text(), flags=re.MULTILINE))
    assert len(pins) > 100
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert pins["torchvision"] == environment.package_version("torchvision").split("+")[0]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="OpenBLAS's Haswell kernel is an x86_64 one")
def test_the_blas_kernel_is_recorded_and_follows_openblas_coretype() -> None:
    # the tune stage's Gaussian process runs on numpy's BLAS: another kernel moves its last bits
    def record(coretype: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        env |= {"OPENBLAS_CORETYPE": coretype} if coretype else {}
        out = subprocess.run(
            [sys.executable, "-m", "sstl.core.environment"], env=env, capture_output=True, text=True, check=True
        ).stdout
        return dict(line.split(": ", 1) for line in out.splitlines())

    haswell = record("Haswell")
    assert haswell["openblas_coretype"] == "Haswell"
    assert haswell["blas"].startswith("openblas ") and " Haswell x" in haswell["blas"]
    assert record(None)["openblas_coretype"] == "none"
