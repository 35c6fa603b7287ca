"""core/errors.py"""

from __future__ import annotations


class SstlError(Exception):
    """A mistake the user can fix (bad params, bad data, missing file); the message says how."""

    exit_code = 1


class DivergedError(SstlError):
    """Training met a non-finite loss: the message names the epoch, the batch and the lr to lower."""


class ParamsError(SstlError):
    """params.yaml does not validate: unknown key, wrong type or value out of range."""

    exit_code = 2
