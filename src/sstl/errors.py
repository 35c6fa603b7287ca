"""Domain errors: a user mistake becomes one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class SstlError(Exception):
    """A mistake the user can fix (bad params, bad data, missing file); the message says how."""

    exit_code = 1


class DivergedError(SstlError):
    """Training met a non-finite loss: the message names the epoch, the batch and the lr to lower."""


class ParamsError(SstlError):
    """params.yaml does not validate: unknown key, wrong type or value out of range."""

    exit_code = 2


def stage_main(fn: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): its outputs' folders are checked writable first (under DVC, which names
    the stage in DVC_STAGE), and an SstlError, or a full or read-only disk, prints `error: <message>`
    on stderr and exits non-zero."""

    @functools.wraps(fn)
    def wrapper() -> T:
        from sstl.files import WRITE_ERRORS, check_writable, write_error

        try:
            check_writable(*stage_outputs(os.environ.get("DVC_STAGE", "")))
            return fn()
        except SstlError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except OSError as err:
            if err.errno not in WRITE_ERRORS or not err.filename:
                raise
            if err.errno in (errno.EACCES, errno.EPERM):  # a read or a write: name the file, not the disk
                print(
                    f"error: cannot access {err.filename}: {WRITE_ERRORS[err.errno]}: check its permissions",
                    file=sys.stderr,
                )
            else:  # full, over quota or read-only: the folder and its free space
                print(f"error: {write_error(Path(err.filename), err.errno)}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def stage_outputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """Files a DVC stage writes (`outs`, `metrics`, `plots` in dvc.yaml); folders as a file inside them.
    A `foreach` stage (`student@1`) is its `do` template with `${item.<key>}` of that iteration, read from
    params.yaml (e.g. `foreach: ${rounds}`); paths left with other `${...}` are skipped."""
    if not stage or not dvc_yaml.is_file():
        return []
    group, _, key = stage.partition("@")
    spec = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}).get(group, {})
    item: dict = {}
    if key and "foreach" in spec:
        item = _foreach_item(str(spec["foreach"]), key, dvc_yaml.parent / "params.yaml")
        spec = spec.get("do", {})
    entries = [e for key in ("outs", "metrics", "plots") for e in spec.get(key, [])]
    names = [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries]
    paths = [Path(re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item.get(m[1], m[0])), n)) for n in names]
    return [p if p.suffix else p / "_" for p in paths if "${" not in str(p)]


def _foreach_item(foreach: str, key: str, params: Path) -> dict:
    """Iteration `key` of a `foreach: ${<params key>}` over a list (key: the index) or a mapping; {} if unknown."""
    found = re.fullmatch(r"\$\{(\w+)\}", foreach.strip())
    data = yaml.safe_load(params.read_text(encoding="utf-8")) if found and params.is_file() else None
    values = data.get(found[1]) if isinstance(data, dict) and found else None
    if isinstance(values, list) and key.isdigit() and int(key) < len(values):
        values = values[int(key)]
    elif isinstance(values, dict):
        values = values.get(key)
    return values if isinstance(values, dict) else {}
