"""The steps the stages are made of, with explicit arguments: stages, CLI and tests call these.

Each step trains or scores with the pure library (training, pseudolabel, metrics) and hands its
figures to `tracking`, so no training loop ever talks to MLflow itself.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import torch

from sstl import tracking
from sstl.dataset import ImageSet, load_images
from sstl.files import write_csv
from sstl.metrics import classification_report
from sstl.models import Classifier, ModelConfig, create_model, save_checkpoint
from sstl.params import TeacherParams
from sstl.precision import Precision
from sstl.pseudolabel import SelectConfig, file_digest, infer, select_pool
from sstl.training import FitResult, TrainConfig, fit, seed_everything
from sstl.transforms import normalize
from sstl.tune import SpaceEntry, search


def fit_summary(result: FitResult) -> dict[str, float]:
    return {
        "best_val_loss": result.best_val_loss,
        "best_val_acc": result.best_val_acc,
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 3),
        "train_images_per_second": round(result.images_per_second, 1),
    }


def build_model(cfg: ModelConfig, num_classes: int, seed: int) -> Classifier:
    """create_model with the RNG seeded first, so the same seed gives the same initial weights."""
    seed_everything(seed)
    return create_model(cfg, num_classes)


def train_and_save(
    model: Classifier,
    model_cfg: ModelConfig,
    schedule: TrainConfig,
    train: ImageSet,
    val: ImageSet,
    classes: list[str],
    seed: int,
    checkpoint: Path,
    curve: Path,
    augment: A.Compose | None = None,
    config: dict[str, Any] | None = None,
    precision: Precision = "fp32",
) -> FitResult:
    """Fit, then write the checkpoint (with its resolved config and precision) and the per-epoch curve; log both."""
    result = fit(
        model, train, val, schedule, len(classes), seed, augment, tracking.log_epoch, checkpoint.stem, precision
    )
    image_size = int(train.images.shape[1])
    save_checkpoint(
        checkpoint,
        model,
        model_cfg,
        classes,
        image_size,
        config=(config or {}) | {"precision": precision},
        fit=fit_summary(result),
    )
    write_csv(curve, result.history)
    tracking.log_metrics(fit_summary(result))
    tracking.log_artifacts(curve)
    tracking.log_model(model, normalize(val.images[:2]).numpy())
    return result


def tune_teacher(
    teacher: TeacherParams,
    space: dict[str, SpaceEntry],
    train: ImageSet,
    val: ImageSet,
    num_classes: int,
    n_random: int,
    n_guided: int,
    seed: int,
    precision: Precision = "fp32",
) -> list[dict[str, Any]]:
    """Search `space` around `teacher`; each trial trains a teacher and is logged as a nested run."""

    def objective(trial: int, overrides: dict[str, Any]) -> dict[str, float]:
        cfg = TeacherParams.model_validate({**teacher.model_dump(), **overrides})
        with tracking.trial_run(trial, overrides):
            model = build_model(cfg.model(), num_classes, seed)
            result = fit(
                model,
                train,
                val,
                cfg.schedule(),
                num_classes,
                seed,
                None,
                tracking.log_epoch,
                f"trial {trial}",
                precision,
            )
            figures = {"val_loss": result.best_val_loss, "val_acc": result.best_val_acc}
            tracking.log_metrics(figures)
        return figures

    trials = search(space, objective, n_random, n_guided, seed)
    for t in trials:
        tracking.log_metrics({"trial_val_loss": t["val_loss"], "best_so_far": t["best_so_far"]}, step=t["trial"])
    return trials


def pseudolabel(
    model: Classifier,
    prepared: Path,
    cfg: SelectConfig,
    classes: list[str],
    state_dir: Path | None = None,
    on_shard: Callable[[int], None] | None = None,
    precision: Precision = "fp32",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Stream the teacher over the prepared unlabelled pool and select; (selected rows, per-class counts).

    The pool is read shard by shard from its memory-mapped .npy (see select_pool: resumable from
    `state_dir`, shared among torchrun processes). None on torchrun ranks other than 0.
    """
    images = load_images(prepared, "unlabeled")
    manifest = Path(prepared) / "manifest.csv"
    selection = select_pool(model, images, cfg, len(classes), state_dir, file_digest(manifest), on_shard, precision)
    if selection is None:
        return None
    index, label, score = selection
    paths = split_paths(manifest, "unlabeled", set(index.tolist()))
    rows = [
        {"index": i, "path": paths[i], "label": classes[c], "label_index": c, "score": round(s, 6)}
        for i, c, s in zip(index.tolist(), label.tolist(), score.tolist(), strict=True)
    ]
    n = Counter(r["label"] for r in rows)
    counts = [{"class": name, "count": n.get(name, 0)} for name in classes]
    return rows, counts


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


def evaluate_model(
    model: Classifier, data: ImageSet, num_classes: int, bins: int, precision: Precision = "fp32"
) -> dict[str, Any]:
    logits = infer(model, data.images, desc="evaluate", precision=precision)
    return classification_report(logits, data.labels, num_classes, bins)
