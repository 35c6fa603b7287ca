"""Hyperparameter search with scikit-optimize: random trials first, then Gaussian-process guided ones.

The space is declared in params.yaml (`tune.space`), one entry per teacher key:
`{low, high}` (integers when both are integers), optionally `prior: log-uniform`, or `{values: [...]}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from skopt import Optimizer
from skopt.space import Categorical, Dimension, Integer, Real


class SpaceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    low: int | float | None = None  # int | float keeps YAML's 0 apart from 0.0: ints give an Integer range
    high: int | float | None = None
    prior: Literal["uniform", "log-uniform"] = "uniform"
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        if self.values is not None:
            if self.low is not None or self.high is not None or not self.values:
                raise ValueError("give either a non-empty `values` list or `low` and `high`")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give `low` < `high`, or a `values` list")
        elif self.prior == "log-uniform" and self.low <= 0:
            raise ValueError("log-uniform needs low > 0")
        return self

    def dimension(self, name: str) -> Dimension:
        if self.values is not None:
            return Categorical(self.values, name=name)
        assert self.low is not None and self.high is not None
        if isinstance(self.low, int) and isinstance(self.high, int):
            return Integer(self.low, self.high, prior=self.prior, name=name)
        return Real(self.low, self.high, prior=self.prior, name=name)


def _plain(value: Any) -> Any:
    """numpy scalars (what skopt hands back) -> Python scalars, so params serialise cleanly."""
    return value.item() if hasattr(value, "item") else value


def search(
    space: dict[str, SpaceEntry],
    objective: Callable[[int, dict[str, Any]], dict[str, float]],
    n_random: int,
    n_guided: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Run n_random + n_guided trials; `objective(trial, params)` returns at least {"val_loss": ...}.

    Returns one row per trial: trial, kind, the params, the objective's figures, seconds, best_so_far.
    """
    names = list(space)
    opt = Optimizer(
        [space[n].dimension(n) for n in names],
        base_estimator="GP",
        n_initial_points=n_random,
        initial_point_generator="random",
        random_state=seed,
    )
    trials: list[dict[str, Any]] = []
    best = math.inf
    for trial in range(n_random + n_guided):
        point = opt.ask()
        params = {n: _plain(v) for n, v in zip(names, point, strict=True)}
        t0 = time.perf_counter()
        result = objective(trial, params)
        seconds = time.perf_counter() - t0
        loss = result["val_loss"] if math.isfinite(result["val_loss"]) else 1e6  # diverged: a bad score
        opt.tell(point, loss)
        best = min(best, loss)
        trials.append(
            {
                "trial": trial,
                "kind": "random" if trial < n_random else "guided",
                **params,
                **result,
                "seconds": round(seconds, 3),
                "best_so_far": best,
            }
        )
    return trials


def best_params(trials: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The params of the trial with the lowest val_loss (the first one on ties)."""
    winner = min(trials, key=lambda t: t["val_loss"] if math.isfinite(t["val_loss"]) else math.inf)
    return {n: winner[n] for n in names}
