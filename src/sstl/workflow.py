"""The steps the stages are made of, with explicit arguments: stages, CLI and tests call these.

Each step trains or scores with the pure library (training, pseudolabel, metrics) and hands its
figures to `tracking`, so no training loop ever talks to MLflow itself.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstl import tracking
from sstl.dataset import ImageSet, load_images
from sstl.errors import DivergedError, SstlError
from sstl.files import check_writable, write_csv
from sstl.inference import Tta, infer
from sstl.metrics import classification_report
from sstl.models import Classifier, ModelConfig, create_model, save_checkpoint
from sstl.params import TeacherParams
from sstl.pseudolabel import SelectConfig, file_digest, select_pool_logits, soft_targets
from sstl.runtime import CPU, Runtime, world
from sstl.training import FitResult, TrainConfig, data_digest, drop_state, fit, seed_everything
from sstl.transforms import Augmenter, augmenter
from sstl.tune import SpaceEntry, search


def fit_summary(result: FitResult) -> dict[str, float]:
    """What a checkpoint keeps of a fit: figures that the same params and seed reproduce (no timings)."""
    return {
        "best_val_loss": result.best_val_loss,
        "best_val_acc": result.best_val_acc,
        "epochs_run": len(result.history),
    }


def fit_speed(result: FitResult) -> dict[str, float]:
    return {
        "train_seconds": round(result.seconds, 3),
        "train_images_per_second": round(result.images_per_second, 1),
    }


def build_model(cfg: ModelConfig, num_classes: int, seed: int) -> Classifier:
    """create_model with the RNG seeded first, so the same seed gives the same initial weights."""
    seed_everything(seed)
    return create_model(cfg, num_classes)


@dataclass
class Job:
    """One network to train and where its results go: what teacher, student and finetune share."""

    model: Classifier
    model_cfg: ModelConfig
    schedule: TrainConfig
    checkpoint: Path
    curve: Path
    config: dict[str, Any] = field(default_factory=dict)
    packing: dict[str, Any] = field(default_factory=dict)  # prepare's image_size and interpolation


def train_and_save(
    job: Job,
    train: ImageSet,
    val: ImageSet,
    *,
    classes: list[str],
    seed: int,
    runtime: Runtime = CPU,
    augment: Augmenter | None = None,
    augment_head: bool = True,
    feature_cache: Path | None = None,
    state: Path | None = None,
    targets: torch.Tensor | None = None,
) -> FitResult:
    """Fit, then (on rank 0) write the checkpoint, with its resolved config and runtime, and the per-epoch
    curve; log both. Under torchrun every process trains; one writes.

    `state`: fit's per-epoch resumable state. It is removed only once everything here is written and
    logged, so a kill during the checkpoint or the MLflow upload resumes at the end of training."""
    lead = world()[0] == 0
    if lead:  # fail now, not after the training, when the checkpoint or the epoch state cannot be written
        model_mb = sum(t.numel() * t.element_size() for t in job.model.state_dict().values()) / 2**20
        check_writable(job.checkpoint, job.curve, need_mb=1.1 * model_mb)
        if state is not None:  # weights, best weights, Adam's two moments
            check_writable(state, need_mb=4.4 * model_mb)
    result = fit(
        job.model,
        train,
        val,
        job.schedule,
        num_classes=len(classes),
        seed=seed,
        runtime=runtime,
        augment=augment,
        augment_head=augment_head,
        on_epoch=tracking.log_epoch if lead else None,
        desc=job.checkpoint.stem,
        feature_cache=feature_cache,
        state=state,
        keep_state=True,
        targets=targets,
    )
    if not lead:
        return result
    for row in result.history[: result.resumed_from_epoch]:  # trained by a killed run: this run's curve too
        tracking.log_epoch(row)
    save_checkpoint(
        job.checkpoint,
        job.model,
        job.model_cfg,
        classes,
        int(train.images.shape[1]),
        config=job.config | {"precision": runtime.precision, "device": str(runtime.device)},
        fit=fit_summary(result),
        interpolation=job.packing.get("interpolation", job.model.data.interpolation),
    )
    write_csv(job.curve, [{k: v for k, v in row.items() if k != "seconds"} for row in result.history])
    tracking.log_metrics(fit_summary(result) | fit_speed(result) | {"resumed_from_epoch": result.resumed_from_epoch})
    tracking.log_artifacts(job.curve)
    # the model itself stays in DVC (stored once); the run names which file it made
    tracking.set_tags({"checkpoint": job.checkpoint, "checkpoint_sha256": file_digest(job.checkpoint)})
    job.model.cpu()
    drop_state(state)
    return result


def tune_teacher(
    teacher: TeacherParams,
    space: dict[str, SpaceEntry],
    labeled: ImageSet,
    val: ImageSet,
    *,
    num_classes: int,
    trials: tuple[int, int],
    seed: int,
    runtime: Runtime = CPU,
    frozen_backbone: bool = False,
    feature_cache: Path | None = None,
    state_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Search `space` around `teacher` with (n_random, n_guided) `trials`; each trains a teacher and is
    logged as a nested run. `frozen_backbone`: trials train the head only (phase 1, on cached features).

    `state_dir`: finished trials go to `trials.json` there, the running trial's epochs to
    `trial-NN.pt`, so a killed search resumes inside its current trial. Returned rows hold no wall
    time (the stage writes them to DVC-tracked files that must not change from run to run): each
    trial's seconds go to MLflow."""
    ran: set[int] = set()  # trials trained here; the others were replayed from trials.json

    def objective(trial: int, overrides: dict[str, Any]) -> dict[str, float]:
        ran.add(trial)
        cfg = TeacherParams.model_validate({**teacher.model_dump(), **overrides})
        schedule = cfg.schedule()
        if frozen_backbone:
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
                    num_classes=num_classes,
                    seed=seed,
                    runtime=runtime,
                    augment=None if cfg.augment is None else augmenter(cfg.augment, int(labeled.images.shape[1]), seed),
                    augment_head=cfg.augment is None or cfg.augment.head_phase,
                    on_epoch=tracking.log_epoch,
                    desc=f"trial {trial}",
                    feature_cache=feature_cache,
                    state=None if state_dir is None else state_dir / f"trial-{trial:02d}.pt",
                    keep_state=True,  # until search has recorded the trial: see _drop_trial_states
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

    fingerprint = _tune_fingerprint(
        teacher,
        space,
        labeled,
        val,
        num_classes=num_classes,
        trials=trials,
        seed=seed,
        runtime=runtime,
        frozen_backbone=frozen_backbone,
    )
    found = search(
        space,
        objective,
        n_random=trials[0],
        n_guided=trials[1],
        seed=seed,
        state=None if state_dir is None else state_dir / "trials.json",
        fingerprint=fingerprint,
    )
    _drop_trial_states(state_dir, before=len(found))
    _log_trials(found, ran, list(space))
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


def _tune_fingerprint(
    teacher: TeacherParams,
    space: dict[str, SpaceEntry],
    labeled: ImageSet,
    val: ImageSet,
    *,
    num_classes: int,
    trials: tuple[int, int],
    seed: int,
    runtime: Runtime,
    frozen_backbone: bool,
) -> str:
    """sha256 naming a search: its params, seed, data, starting weights and runtime. Finished trials of
    another search are not replayed."""
    h = hashlib.sha256()
    if Path(teacher.weights).is_file():  # e.g. the pretrain stage's checkpoint: its path stays, its bytes change
        h.update(file_digest(teacher.weights).encode())
    spec = {n: e.model_dump() for n, e in space.items()}
    parts = (teacher.model_dump_json(), json.dumps(spec, sort_keys=True), num_classes, trials, seed, frozen_backbone)
    for part in (*parts, runtime.precision, runtime.describe()["device_name"], torch.__version__):
        h.update(f"{part}\n".encode())
    for data in (labeled, val):
        h.update(data_digest(data.images, data.labels).encode())
    return h.hexdigest()


def _drop_trial_states(state_dir: Path | None, *, before: int) -> None:
    """Remove the per-epoch states of trials < `before`: search has recorded them as finished."""
    if state_dir is None:
        return
    for trial in range(before):
        drop_state(state_dir / f"trial-{trial:02d}.pt")


def pseudolabel(
    model: Classifier,
    prepared: Path,
    cfg: SelectConfig,
    classes: list[str],
    *,
    state_dir: Path | None = None,
    on_shard: Callable[[int], None] | None = None,
    runtime: Runtime = CPU,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor] | None:
    """Stream the teacher over the prepared unlabelled pool and select: (selected rows, per-class
    counts, soft targets), the soft targets float32 (M, C), row i = softmax(logits / cfg.temperature)
    of the image of rows[i] (an image selected for two classes has its distribution in both rows).

    The pool is read shard by shard from its memory-mapped .npy (see select_pool_logits: resumable
    from `state_dir`, shared among torchrun processes). None on torchrun ranks other than 0.
    """
    images = load_images(prepared, "unlabeled")
    manifest = Path(prepared) / "manifest.csv"
    selected = select_pool_logits(
        model,
        images,
        cfg,
        len(classes),
        state_dir=state_dir,
        pool_id=file_digest(manifest),
        on_shard=on_shard,
        runtime=runtime,
    )
    if selected is None:
        return None
    (index, label, score), logits = selected
    paths = split_paths(manifest, "unlabeled", set(index.tolist()))
    rows = [
        {"index": i, "path": paths[i], "label": classes[c], "label_index": c, "score": round(s, 6)}
        for i, c, s in zip(index.tolist(), label.tolist(), score.tolist(), strict=True)
    ]
    n = Counter(r["label"] for r in rows)
    counts = [{"class": name, "count": n.get(name, 0)} for name in classes]
    return rows, counts, soft_targets(logits, cfg.temperature)


def split_paths(manifest: Path, split: str, wanted: set[int]) -> dict[int, str]:
    """{position in `split`: path} for the wanted positions, reading the manifest row by row."""
    found: dict[int, str] = {}
    with Path(manifest).open(newline="", encoding="utf-8") as f:
        rows = (r["path"] for r in csv.DictReader(f) if r["split"] == split)
        for i, path in enumerate(rows):
            if i in wanted:
                found[i] = path
    return found


def pseudo_set(pool: ImageSet, rows: list[dict[str, str]]) -> ImageSet:
    """The pseudo-labelled images as an ImageSet (an image chosen for two classes appears twice)."""
    index = torch.tensor([int(r["index"]) for r in rows], dtype=torch.int64)
    chosen = pool.subset(index)
    chosen.labels = torch.tensor([int(r["label_index"]) for r in rows], dtype=torch.int64)
    return chosen


def pseudo_targets(
    pool: ImageSet, rows: list[dict[str, str]], probs: np.ndarray | torch.Tensor
) -> tuple[ImageSet, torch.Tensor]:
    """The pseudo-labelled images with their hard labels (pseudo_set) and soft targets: float32 (M, C),
    row i the teacher's distribution for rows[i] (pseudo_files(teacher): the .csv and .npy as the
    pseudolabel stage wrote them; for a cross-entropy with probability targets)."""
    targets = probs.float() if isinstance(probs, torch.Tensor) else torch.from_numpy(np.array(probs, dtype=np.float32))
    if targets.ndim != 2 or len(targets) != len(rows):
        raise SstlError(
            f"the soft targets hold {tuple(targets.shape)} values for {len(rows)} pseudo-labels: they must be "
            "(pseudo-labels, classes) of the same pseudolabel run (re-run it: `dvc repro pseudolabel`)"
        )
    chosen = pseudo_set(pool, rows)
    if len(rows) and int(chosen.labels.max()) >= targets.shape[1]:
        raise SstlError(
            f"a pseudo-label names class {int(chosen.labels.max())}, the soft targets have {targets.shape[1]}"
        )
    return chosen, targets


def evaluate_model(
    model: Classifier, data: ImageSet, *, num_classes: int, bins: int, runtime: Runtime = CPU, tta: Tta = "none"
) -> dict[str, Any]:
    logits = infer(model, data.images, runtime=runtime, desc="evaluate", tta=tta)
    return classification_report(logits, data.labels, num_classes, bins)
