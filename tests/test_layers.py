"""The package's layers (pyproject.toml's [tool.importlinter]): imports point one way, config stays torch-free."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(root / "src")}  # this tree's sstl, not the installed one
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def copy_project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" not in res.stdout.lower().replace("0 broken", "")


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    files = root / "src/sstl/core/files.py"
    files.write_text(files.read_text() + "\n\ndef _late() -> None:\n    from sstl.train import loop  # noqa: F401\n")
    res = lint(root)
    assert res.returncode != 0
    assert "sstl.core.files -> sstl.train.loop" in res.stdout


def test_config_importing_torch_breaks_the_contract(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    config = root / "src/sstl/config/train.py"
    config.write_text(config.read_text() + "\nimport torch  # noqa: E402,F401\n")
    res = lint(root)
    assert res.returncode != 0
    assert "sstl.config.train -> torch" in res.stdout
