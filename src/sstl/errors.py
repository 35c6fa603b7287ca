"""Domain errors: a user mistake becomes one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class SstlError(Exception):
    """A mistake the user can fix (bad params, bad data, missing file); the message says how."""

    exit_code = 1


class ParamsError(SstlError):
    """params.yaml does not validate: unknown key, wrong type or value out of range."""

    exit_code = 2


def stage_main(fn: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): an SstlError prints `error: <message>` on stderr and exits non-zero."""

    @functools.wraps(fn)
    def wrapper() -> T:
        try:
            return fn()
        except SstlError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper
