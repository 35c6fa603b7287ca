"""The tune stage's body: Bayesian search over the teacher's hyperparameters, one MLflow run per trial."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sstl.config.train import SpaceEntry
from sstl.core.errors import DivergedError
from sstl.core.files import file_digest
from sstl.data.dataset import ImageSet
from sstl.data.transforms import augmenter
from sstl.params import TeacherParams
from sstl.pipeline.train import build_model
from sstl.runtime.device import Runtime
from sstl.track import tracking
from sstl.train.loop import fit
from sstl.train.resume import data_digest, drop_state
from sstl.train.setup import FitSetup
from sstl.train.tune import search


@dataclass(frozen=True, kw_only=True)
class TeacherSearch:
    """One teacher search: the space around `teacher`, (n_random, n_guided) trials, and how trials train."""

    teacher: TeacherParams
    space: dict[str, SpaceEntry]
    trials: tuple[int, int]
    num_classes: int
    seed: int
    runtime: Runtime
    frozen_backbone: bool = False  # trials train the head only (phase 1, on cached features)

    def fingerprint(self, labeled: ImageSet, val: ImageSet) -> str:
        """sha256 naming the search: its params, seed, data, starting weights and runtime. Finished trials
        of another search are not replayed."""
        h = hashlib.sha256()
        if Path(self.teacher.weights).is_file():  # e.g. the pretrain stage's checkpoint: its path stays, not its bytes
            h.update(file_digest(self.teacher.weights).encode())
        spec = {n: e.model_dump() for n, e in self.space.items()}
        parts = (self.teacher.model_dump_json(), json.dumps(spec, sort_keys=True), self.num_classes, self.trials)
        runtime = self.runtime
        for part in (*parts, self.seed, self.frozen_backbone, runtime.precision, runtime.describe()["device_name"]):
            h.update(f"{part}\n".encode())
        h.update(f"{torch.__version__}\n".encode())
        for data in (labeled, val):
            h.update(data_digest(data.images, data.labels).encode())
        return h.hexdigest()


def tune_teacher(
    job: TeacherSearch,
    labeled: ImageSet,
    val: ImageSet,
    *,
    feature_cache: Path | None = None,
    state_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Run the search: each trial trains a teacher and is logged as a nested run.

    `state_dir`: finished trials go to `trials.json` there, the running trial's epochs to
    `trial-NN.pt`, so a killed search resumes inside its current trial. Returned rows hold no wall
    time (the stage writes them to DVC-tracked files that must not change from run to run): each
    trial's seconds go to MLflow."""
    ran: set[int] = set()  # trials trained here; the others were replayed from trials.json
    teacher, num_classes, seed, runtime = job.teacher, job.num_classes, job.seed, job.runtime

    def objective(trial: int, overrides: dict[str, Any]) -> dict[str, float]:
        ran.add(trial)
        cfg = TeacherParams.model_validate({**teacher.model_dump(), **overrides})
        schedule = cfg.schedule()
        if job.frozen_backbone:
            schedule = schedule.model_copy(update={"epochs": 0, "head_epochs": max(schedule.head_epochs, 1)})
        _drop_trial_states(state_dir, before=trial)  # earlier trials are in trials.json by now
        with tracking.trial_run(trial, overrides):
            model = build_model(cfg.model(), num_classes, seed)
            try:
                result = fit(
                    model,
                    labeled,
                    val,
                    schedule,
                    FitSetup(
                        num_classes=num_classes,
                        seed=seed,
                        runtime=runtime,
                        augment=None
                        if cfg.augment is None
                        else augmenter(cfg.augment, int(labeled.images.shape[1]), seed),
                        augment_head=cfg.augment is None or cfg.augment.head_phase,
                        desc=f"trial {trial}",
                        feature_cache=feature_cache,
                    ),
                    on_epoch=tracking.log_epoch,
                    state=None if state_dir is None else state_dir / f"trial-{trial:02d}.pt",
                    keep_state=True,
                )
            except DivergedError as err:  # a bad point of the space, not a failed search: score it, go on
                print(f"tune: trial {trial} {err}: scored as the worst, the search goes on")
                tracking.set_tags({"diverged": str(err)})
                return {"val_loss": math.nan, "val_acc": 0.0}
            for row in result.history[: result.resumed_from_epoch]:
                tracking.log_epoch(row)
            figures = {"val_loss": result.best_val_loss, "val_acc": result.best_val_acc}
            tracking.log_metrics(figures | {"resumed_from_epoch": result.resumed_from_epoch})
        return figures

    found = search(
        job.space,
        objective,
        n_random=job.trials[0],
        n_guided=job.trials[1],
        seed=seed,
        state=None if state_dir is None else state_dir / "trials.json",
        fingerprint=job.fingerprint(labeled, val),
    )
    _drop_trial_states(state_dir, before=len(found))
    _log_trials(found, ran, list(job.space))
    return [{k: v for k, v in t.items() if k != "seconds"} for t in found]


def _log_trials(found: list[dict[str, Any]], ran: set[int], names: list[str]) -> None:
    """Per-trial figures (with wall seconds) on the tune run; a replayed trial, whose nested run was
    left by a killed process, gets a nested run here with its params and figures."""
    for t in found:
        if t["trial"] not in ran:
            with tracking.trial_run(t["trial"], {n: t[n] for n in names}):
                tracking.log_metrics({"val_loss": t["val_loss"], "val_acc": t["val_acc"], "replayed": 1})
        figures = {"trial_val_loss": t["val_loss"], "best_so_far": t["best_so_far"], "trial_seconds": t["seconds"]}
        tracking.log_metrics(figures, step=t["trial"])


def _drop_trial_states(state_dir: Path | None, *, before: int) -> None:
    """Remove the per-epoch states of trials < `before`: search has recorded them as finished."""
    if state_dir is None:
        return
    for trial in range(before):
        drop_state(state_dir / f"trial-{trial:02d}.pt")
