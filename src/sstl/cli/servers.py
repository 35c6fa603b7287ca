"""Servers the CLI starts (MLflow UI, model serving) as a process group that dies with the command."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from sstl.core.errors import SstlError

STOPS = (signal.SIGTERM, signal.SIGHUP)  # kill, and the terminal closing: both take the server's group down


def check_port(host: str, port: int) -> None:
    """Before starting a server: the address is free, else one line naming it and the fix (a server
    that fails to bind prints its own traceback, or worse, exits 0)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise SstlError(f"cannot serve on {host}: {err.strerror}: pass --host an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        # as the servers themselves bind (uvicorn, gunicorn): connections of a stopped server still in
        # TIME_WAIT do not hold the port, a listening socket does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise SstlError(f"port {port} on {host} is in use: stop what holds it, or pass --port") from None
            raise SstlError(f"cannot serve on {host}:{port}: {err.strerror}: pass another --host or --port") from None


def run_server(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Run a server in its own process group until it exits or this process is stopped (Ctrl+C,
    SIGTERM, SIGHUP): then the whole group goes, workers included, so nothing is left listening."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, cwd=cwd)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in STOPS}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid):
            break
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.1)
