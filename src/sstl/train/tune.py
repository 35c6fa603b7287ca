"""Hyperparameter search with scikit-optimize: random trials first, then Gaussian-process guided ones.

The space is declared in params.yaml (`tune.space`), one entry per teacher key:
`{low, high}` (integers when both are integers), optionally `prior: log-uniform`, or `{values: [...]}`.

A search given a `state` file records every finished trial there; a search restarted after a kill
replays them (the optimizer is asked and told the same points, so it suggests the same next ones)
and continues with the first unfinished trial.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sstl.config.train import SpaceEntry
from sstl.core.errors import SstlError
from sstl.core.files import write_json


def _plain(value: Any) -> Any:
    """numpy scalars (what skopt hands back) -> Python scalars, so params serialise cleanly."""
    return value.item() if hasattr(value, "item") else value


def search(
    space: dict[str, SpaceEntry],
    objective: Callable[[int, dict[str, Any]], dict[str, float]],
    *,
    n_random: int,
    n_guided: int,
    seed: int,
    state: Path | None = None,
    fingerprint: str = "",
) -> list[dict[str, Any]]:
    """Run n_random + n_guided trials; `objective(trial, params)` returns at least {"val_loss": ...}.

    Returns one row per trial: trial, kind, the params, the objective's figures, seconds, best_so_far.
    `state`: finished trials are saved there (with `fingerprint`, which names the search and its
    data) and replayed by a restarted search with the same fingerprint. The file is kept when the
    search ends: a kill while the caller writes its outputs must not cost the whole search.
    """
    from skopt import Optimizer

    names = list(space)
    opt = Optimizer(
        [space[n].dimension(n) for n in names],
        base_estimator="GP",
        n_initial_points=n_random,
        initial_point_generator="random",
        random_state=seed,
    )
    total = n_random + n_guided
    done = _finished_trials(state, fingerprint, total)
    trials: list[dict[str, Any]] = []
    best = math.inf
    for trial in range(total):
        point = opt.ask()  # replayed trials are asked too: skopt's RNG must advance as it did
        params = {n: _plain(v) for n, v in zip(names, point, strict=True)}
        if trial < len(done) and {n: done[trial][n] for n in names} != params:
            print(f"tune: trial {trial} asked other params than {state} records: continuing without it")
            done = done[:trial]
        if trial < len(done):
            row = done[trial]
        else:
            t0 = time.perf_counter()
            result = objective(trial, params)
            row = {"trial": trial, "kind": "random" if trial < n_random else "guided", **params, **result}
            row["seconds"] = round(time.perf_counter() - t0, 3)
        loss = row["val_loss"] if math.isfinite(row["val_loss"]) else 1e6  # diverged: a bad score
        opt.tell(point, loss)
        best = min(best, loss)
        trials.append(row | {"best_so_far": best})
        if state is not None and trial >= len(done):
            write_json(state, {"fingerprint": fingerprint, "trials": trials})  # whole or not at all
    return trials


def _finished_trials(state: Path | None, fingerprint: str, total: int) -> list[dict[str, Any]]:
    """The trials a killed search with the same fingerprint finished; [] when there is none (one line says why)."""
    if state is None or not Path(state).is_file():
        return []
    try:
        saved = json.loads(Path(state).read_text(encoding="utf-8"))
        rows = saved["trials"]
        if not isinstance(rows, list):
            raise TypeError("trials is not a list")
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"tune: ignoring unreadable {state} ({type(err).__name__}): searching from the first trial")
        return []
    if saved.get("fingerprint") != fingerprint:
        print(f"tune: ignoring {state}: saved by another search (params, seed or data differ)")
        return []
    rows = rows[:total]
    print(f"tune: resuming after trial {len(rows)} of {total} ({state})", flush=True)
    return rows


def best_params(trials: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The params of the trial with the lowest val_loss (the first one on ties); diverged trials never win."""
    finite = [t for t in trials if math.isfinite(t["val_loss"])]
    if not finite:
        raise SstlError(f"all {len(trials)} tune trials diverged: lower tune.space.lr's high end (or teacher.lr)")
    winner = min(finite, key=lambda t: t["val_loss"])
    return {n: winner[n] for n in names}
