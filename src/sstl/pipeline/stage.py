"""What every stage script shares: its paths from the command line, and errors as one line.

dvc.yaml's `cmd` names each path a stage reads or writes (`python stages/prepare.py --out
data/prepared ...`, as iterative/example-get-started does), so a path is written once, where DVC
also tracks it; the script reads them from argv and checks its outputs' folders before any work.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sstl.core.errors import SstlError
from sstl.core.files import WRITE_ERRORS, check_writable, write_error

T = TypeVar("T")


def stage_main(fn: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): an SstlError, or a full or read-only disk, prints `error: <message>` on
    stderr and exits non-zero, never a traceback."""

    @functools.wraps(fn)
    def wrapper() -> T:
        try:
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


def add_paths(parser: argparse.ArgumentParser, *, inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> None:
    """`--<name> PATH`, required, for each input and output; the outputs are checked by `parse_paths`.
    A name without a suffix (`--out data/prepared`) is a folder."""
    for name in (*inputs, *outputs):
        parser.add_argument(f"--{name}", type=Path, required=True, metavar="PATH")
    parser.set_defaults(_outputs=tuple(name.replace("-", "_") for name in outputs))


def parse_paths(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The stage's arguments; before any work, every output's folder exists and takes a file."""
    args = parser.parse_args(argv)
    outs = [getattr(args, name) for name in getattr(args, "_outputs", ())]
    check_writable(*(p if p.suffix else p / "_" for p in outs))
    return args
