"""What every benchmark table records about where and when it was measured."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """'<CPU model>, <n> cores'."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def stamp() -> dict[str, str]:
    """machine, UTC date, short git commit and the environment: torch's build and the lock file's digest."""
    from sstl.core.environment import describe

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env = describe(ROOT / "requirements.lock")
    return {
        "machine": machine(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "commit": out.stdout.strip(),
        "environment": f"torch {env['torch']}, requirements.lock {env['lock_sha256']}",
    }
