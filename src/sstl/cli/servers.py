"""Servers the CLI starts (MLflow UI, model serving) as a process group that dies with the command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def run_server(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Run a server in its own process group until it exits or this process is stopped (Ctrl+C,
    SIGTERM): then the whole group goes, workers included, so nothing is left listening."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True, env=env, cwd=cwd)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None or _group_alive(proc.pid):
            _kill_group(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to the server's process group, SIGKILL what is left after `grace` seconds."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid):
            break
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.1)
