"""Where a result came from: git commit, DVC experiment, pipeline execution."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def git_commit(cwd: Path | str | None = None) -> str:
    """HEAD's commit hash, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_experiment() -> str:
    """The name `dvc exp run` gives this execution (it sets DVC_EXP_NAME), else 'workspace'."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def pipeline_id(params_file: Path | str = "params.yaml") -> str:
    """Identifies one pipeline execution so its stage runs can be grouped.

    `sstl run` sets SSTL_PIPELINE_ID; a plain `dvc repro` does not, so then the id is derived from
    what defines the execution: the DVC experiment, the commit and the params file's content.
    """
    if os.environ.get("SSTL_PIPELINE_ID"):
        return os.environ["SSTL_PIPELINE_ID"]
    text = Path(params_file).read_bytes() if Path(params_file).is_file() else b""
    key = f"{dvc_experiment()}|{git_commit()}|".encode() + text
    return hashlib.sha256(key).hexdigest()[:12]


def code_digest(root: Path | str | None = None) -> str:
    """sha256 over the library and stage sources (path and bytes, sorted): the code a checkpoint was
    made with. Unlike the commit, it stays the same when a later commit only records results, so
    outputs re-made from the same code are the same bytes; MLflow runs carry the commit beside it."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted([*base.glob("src/sstl/**/*.py"), *base.glob("stages/*.py")]):
        h.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
