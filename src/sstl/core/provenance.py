"""Where a result came from: git commit, DVC experiment, pipeline execution."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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


def code_digest(script: Path | str | None = None) -> str:
    """sha256 over the code the running stage executes: exactly its DVC code deps (its script and the
    closure of its imports, `sstl.core.codedeps`), path and bytes. It changes exactly when DVC re-runs the
    stage, unlike the commit, which a results-only commit changes, so re-made outputs keep their bytes.
    Outside a stage script (a test, a notebook): the whole package. MLflow runs carry the commit."""
    from sstl.core.codedeps import code_deps

    script = Path(script if script is not None else sys.argv[0]).resolve()
    root = script.parents[1] if len(script.parents) > 1 else script.parent
    if script.parent.name == "stages" and (root / "src" / "sstl").is_dir() and script.is_file():
        files = [root / f for f in code_deps(script, root)]
    else:
        package = Path(__file__).resolve().parent
        root, files = package.parent, sorted(package.rglob("*.py"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
