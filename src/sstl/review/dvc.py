"""DVC's JSON output, read through its own command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sstl.core.errors import SstlError


def dvc_json(args: Sequence[str]) -> Any:
    """`python -m dvc <args> --json` with this interpreter (no `dvc` on PATH needed: works outside the
    activated venv, as in CI); a failure is one line naming the command and DVC's last message."""
    cmd = [sys.executable, "-m", "dvc", *args, "--json"]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    except subprocess.CalledProcessError as err:
        lines = [line for line in (err.stderr or err.stdout or "").strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {err.returncode}"
        raise SstlError(f"`dvc {' '.join(args)}` failed: {last}") from None
    try:
        return json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        raise SstlError(f"`dvc {' '.join(args)} --json` printed no JSON: upgrade DVC (>= 3.50)") from None
