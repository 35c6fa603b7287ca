"""How the CLI drives DVC: its environment, params checked before a run, the lock and the status check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml

from sstl.core.errors import SstlError

if TYPE_CHECKING:
    from sstl.params import Params


def dvc_env() -> dict[str, str]:
    """DVC stages call `python`: put this interpreter's folder first so they use this environment."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc(*args: str, env: dict[str, str] | None = None) -> int:
    if not Path("dvc.yaml").is_file():
        raise SstlError("dvc.yaml not found: run sstl from the project root")
    return subprocess.run([sys.executable, "-m", "dvc", *args], env=env or dvc_env()).returncode


def check_lock(lock: Path = Path("dvc.lock")) -> None:
    """An empty or unreadable dvc.lock (DVC writes it in place: a run killed at that moment leaves it
    so) stops here with the one command that restores it, not in DVC with a traceback."""
    if not lock.exists():
        return
    try:
        content = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        content = None
    if isinstance(content, dict) and "stages" in content:
        return
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(lock)], capture_output=True).returncode == 0
    except OSError:  # no git
        tracked = False
    fix = f"git checkout -- {lock}" if tracked else f"rm {lock} (the next run re-runs every stage)"
    raise SstlError(f"{lock} is empty or unreadable (a run was killed while DVC wrote it): restore it with `{fix}`")


def _check_params(overrides: Sequence[str] = ()) -> Params:
    """Validate params.yaml with `key=value` overrides applied, before DVC writes anything."""
    from sstl.params import load_params, parse_params, read_yaml

    if not overrides:
        return load_params(PARAMS)
    if not PARAMS.is_file():
        raise SstlError(f"{PARAMS} not found: run sstl from the project root")
    raw: dict[str, Any] = read_yaml(PARAMS) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SstlError(f"override {item!r} is not key=value (e.g. -S teacher.lr=0.003)")
        if ":" in key:  # another params file: DVC checks it
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SstlError(f"override {key}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SstlError(f"override {item!r}: {value!r} is not a YAML value (quote strings with spaces)") from None
    return parse_params(raw, f"params.yaml with {' '.join(overrides)}")


def before_dvc(overrides: Sequence[str] = ()) -> None:
    """What every command that starts DVC checks first: a readable dvc.lock, valid params, and the
    fingerprint of the photo folder (data/inventory.json, prepare's dep) brought up to date."""
    from sstl.data.inventory import refresh_inventory
    from sstl.data.scan import check_folder

    check_lock()
    folder = Path(_check_params(overrides).data.folder)
    if os.path.lexists(folder):  # there but unusable (a file, unreadable): one line now, not a failed stage
        check_folder(folder)
    refresh_inventory(folder)


def status_check() -> None:
    """`sstl status --check`: exit 1 when dvc.lock is not this tree's (code, params, data changed), one line
    per stale stage. Outputs merely absent (a fresh clone before `dvc pull`) do not count, and the photo
    folder's fingerprint is refreshed only when the folder is there (the demo's is an output)."""
    from sstl.data.inventory import refresh_inventory
    from sstl.data.scan import check_folder
    from sstl.review.diff import stale_stages
    from sstl.review.dvc import dvc_json

    check_lock()
    folder = Path(_check_params().data.folder)
    if folder.exists():
        check_folder(folder)
        refresh_inventory(folder)
    stale, absent = stale_stages(dvc_json(["status"]))
    for stage, changes in stale.items():
        typer.echo(f"{stage}: {_describe(changes)}")
    if stale:
        raise SstlError("the pipeline is not up to date (above): `sstl run` and commit dvc.lock, or `dvc pull`")
    note = f" ({absent} pipeline files not here yet: `dvc pull` or `sstl run` brings them)" if absent else ""
    typer.echo(f"up to date: dvc.lock matches the code, params and data{note}")


def _describe(changes: Any) -> str:
    """One line from a stage's `dvc status --json` entry: `changed deps: a.py (modified); ...`."""
    parts = []
    for change in changes if isinstance(changes, list) else [changes]:
        if isinstance(change, dict):
            for kind, paths in change.items():
                detail = ", ".join(f"{p} ({s})" for p, s in paths.items()) if isinstance(paths, dict) else paths
                parts.append(f"{kind}: {detail}")
        else:
            parts.append(str(change))
    return "; ".join(parts)


PARAMS = Path("params.yaml")
