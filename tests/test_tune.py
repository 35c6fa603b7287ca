"""Hyperparameter search on a cheap analytic objective: trial rows, determinism, best params."""

from __future__ import annotations

import math
from typing import Any

import pytest
from skopt.space import Categorical, Integer, Real

from sstl.config.train import SpaceEntry
from sstl.core.errors import SstlError
from sstl.params import TeacherParams, parse_params
from sstl.runtime.device import CPU
from sstl.train.tune import best_params, search

SPACE = {
    "x": SpaceEntry(low=0.0, high=0.9),
    "n": SpaceEntry(low=0, high=5),
    "act": SpaceEntry(values=["relu", "gelu"]),
}
N_RANDOM, N_GUIDED = 4, 3


def objective(trial: int, params: dict[str, Any]) -> dict[str, float]:
    loss = (params["x"] - 0.3) ** 2 + (params["n"] - 2) ** 2 + (0.1 if params["act"] == "gelu" else 0.0)
    return {"val_loss": loss, "val_acc": 1.0 - min(loss, 1.0)}


def run(seed: int = 0) -> list[dict[str, Any]]:
    return search(SPACE, objective, n_random=N_RANDOM, n_guided=N_GUIDED, seed=seed)


@pytest.fixture(scope="module")
def trials() -> list[dict[str, Any]]:
    return run(0)


def test_space_entry_dimensions() -> None:
    assert isinstance(SpaceEntry(low=0, high=5).dimension("n"), Integer)
    assert isinstance(SpaceEntry(low=0.0, high=0.5).dimension("d"), Real)
    real = SpaceEntry(low=1e-4, high=1e-2, prior="log-uniform").dimension("lr")
    assert isinstance(real, Real) and real.prior == "log-uniform"
    assert isinstance(SpaceEntry(values=[1, 2]).dimension("h"), Categorical)


def test_rows_and_kinds(trials: list[dict[str, Any]]) -> None:
    assert len(trials) == N_RANDOM + N_GUIDED
    assert [t["trial"] for t in trials] == list(range(N_RANDOM + N_GUIDED))
    assert [t["kind"] for t in trials] == ["random"] * N_RANDOM + ["guided"] * N_GUIDED
    for t in trials:
        assert {"x", "n", "act", "val_loss", "val_acc", "seconds", "best_so_far"} <= set(t)
        assert t["val_loss"] == pytest.approx(objective(t["trial"], t)["val_loss"])


def test_params_are_plain_python(trials: list[dict[str, Any]]) -> None:
    for t in trials:
        assert type(t["x"]) is float and 0.0 <= t["x"] <= 0.9
        assert type(t["n"]) is int and 0 <= t["n"] <= 5
        assert type(t["act"]) is str and t["act"] in ("relu", "gelu")
        assert type(t["best_so_far"]) in (float, int)


def test_categorical_values_are_plain_python() -> None:
    space = {
        "flag": SpaceEntry(values=[False, True]),
        "h": SpaceEntry(values=[64, 128]),
        "wd": SpaceEntry(low=1e-5, high=1e-2, prior="log-uniform"),
    }
    rows = search(space, lambda trial, p: {"val_loss": float(p["h"]) + p["wd"]}, n_random=6, n_guided=0, seed=0)
    for r in rows:
        assert type(r["flag"]) is bool
        assert type(r["h"]) is int and r["h"] in (64, 128)
        assert type(r["wd"]) is float and 1e-5 <= r["wd"] <= 1e-2


def test_best_so_far_non_increasing(trials: list[dict[str, Any]]) -> None:
    best = [t["best_so_far"] for t in trials]
    assert all(b >= a for a, b in zip(best[1:], best[:-1], strict=True))
    assert best[-1] == pytest.approx(min(t["val_loss"] for t in trials))
    for i, t in enumerate(trials):
        assert t["best_so_far"] == pytest.approx(min(u["val_loss"] for u in trials[: i + 1]))


def test_same_seed_same_trials(trials: list[dict[str, Any]]) -> None:
    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(run(0)) == strip(trials)
    other = search(SPACE, objective, n_random=N_RANDOM, n_guided=0, seed=1)
    assert strip(other) != strip(trials[:N_RANDOM])


def test_best_params_picks_minimum(trials: list[dict[str, Any]]) -> None:
    best = best_params(trials, ["x", "n", "act"])
    winner = min(trials, key=lambda t: t["val_loss"])
    assert best == {k: winner[k] for k in ("x", "n", "act")}


def test_best_params_first_on_ties() -> None:
    rows = [{"a": 1, "val_loss": 0.5}, {"a": 2, "val_loss": 0.2}, {"a": 3, "val_loss": 0.2}]
    assert best_params(rows, ["a"]) == {"a": 2}


def test_non_finite_loss_is_a_bad_score() -> None:
    def diverging(trial: int, params: dict[str, Any]) -> dict[str, float]:
        return {"val_loss": math.inf if trial == 0 else objective(trial, params)["val_loss"]}

    rows = search(SPACE, diverging, n_random=3, n_guided=1, seed=0)
    assert rows[0]["best_so_far"] == 1e6
    assert all(math.isfinite(r["best_so_far"]) for r in rows)
    assert rows[-1]["best_so_far"] < 1e6


def test_best_params_ignores_a_diverged_first_trial() -> None:
    """A trial whose training diverged (val_loss NaN) must never be chosen as the best."""

    def diverging(trial: int, params: dict[str, Any]) -> dict[str, float]:
        return {"val_loss": math.nan if trial == 0 else objective(trial, params)["val_loss"]}

    rows = search(SPACE, diverging, n_random=3, n_guided=1, seed=0)
    assert math.isnan(rows[0]["val_loss"])
    best = best_params(rows, list(SPACE))
    assert best != {k: rows[0][k] for k in SPACE}, "best_params chose the diverged (NaN) trial"
    finite = [r for r in rows if math.isfinite(r["val_loss"])]
    assert best == {k: min(finite, key=lambda r: r["val_loss"])[k] for k in SPACE}


def test_validated_space_only_proposes_valid_teachers() -> None:
    """params validation promises a bad space fails at load time, not at trial 17: every point the
    search proposes for a space that passed `parse_params` must make a valid teacher."""
    p = parse_params({"tune": {"space": {"hidden_size": {"low": 16, "high": 256, "prior": "log-uniform"}}}})

    def as_teacher(trial: int, params: dict[str, Any]) -> dict[str, float]:
        cfg = TeacherParams.model_validate({**p.teacher.model_dump(), **params})
        return {"val_loss": abs(cfg.hidden_size - 64) / 64}

    rows = search(p.tune.space, as_teacher, n_random=3, n_guided=0, seed=0)
    assert all(type(r["hidden_size"]) is int for r in rows)


def test_a_diverged_trial_is_scored_as_the_worst_and_the_search_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through tune_teacher: trial 1's training really diverges (NaN weights give a NaN loss in the real
    loop); the search records it as NaN, finishes its other trials and never picks it."""
    import torch
    from test_training import TRAIN, VAL

    from sstl.pipeline import tune as workflow
    from sstl.track import tracking

    real_fit = workflow.fit

    def fit_poisoning_trial_1(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if args[3].desc == "trial 1":  # (train, val, cfg, setup)
            with torch.no_grad():
                next(model.head.parameters()).fill_(math.nan)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(workflow, "fit", fit_poisoning_trial_1)
    teacher = TeacherParams.model_validate(
        {"arch": "convnet_s", "head_layers": 0, "head_epochs": 0, "epochs": 1, "batch_size": 20, "unfreeze_blocks": 100}
    )
    space = {"lr": SpaceEntry(low=0.001, high=0.01, prior="log-uniform")}
    with tracking.stage_run("tune", "test-tune-divergence", {}):
        job = workflow.TeacherSearch(teacher=teacher, space=space, trials=(3, 0), num_classes=2, seed=0, runtime=CPU)
        rows = workflow.tune_teacher(job, TRAIN, VAL)
    assert [r["trial"] for r in rows] == [0, 1, 2]
    assert math.isnan(rows[1]["val_loss"]) and rows[1]["val_acc"] == 0.0
    assert all(math.isfinite(rows[i]["val_loss"]) for i in (0, 2))
    assert best_params(rows, ["lr"])["lr"] != rows[1]["lr"]
    assert "tune: trial 1 training diverged: loss nan" in capsys.readouterr().out


def test_all_trials_diverged_is_one_clear_error() -> None:
    rows = [{"trial": t, "lr": 0.1 * (t + 1), "val_loss": math.nan} for t in range(3)]
    with pytest.raises(SstlError, match="all 3 tune trials diverged: lower tune.space.lr"):
        best_params(rows, ["lr"])
