"""The steps the stages are made of, with explicit arguments: stages, CLI and tests call these.

Each step trains or scores with the pure library (training, pseudolabel, metrics) and hands its
figures to `tracking`, so no training loop ever talks to MLflow itself.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.functional import one_hot

from sstl.config.model import ModelConfig
from sstl.config.train import TrainConfig
from sstl.core.files import check_writable, file_digest, read_csv, read_json, write_csv
from sstl.data.dataset import ImageSet, load_classes, load_labelled, load_packing, load_split
from sstl.data.transforms import Augmenter, augmenter
from sstl.eval.probe import fit_probe
from sstl.models.checkpoint import load_checkpoint, save_checkpoint
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model
from sstl.models.weights import resolve_weights
from sstl.params import Params, TeacherParams
from sstl.pipeline.pseudolabel import pseudo_targets, split_paths
from sstl.pseudo.ood import in_distribution
from sstl.runtime.device import Runtime
from sstl.runtime.distributed import distributed, world
from sstl.track import tracking
from sstl.train.consistency import Pool, Screen, fit_consistency
from sstl.train.loop import FitResult, fit, seed_everything
from sstl.train.resume import drop_state
from sstl.train.setup import FitSetup


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
    setup: FitSetup,
    *,
    classes: list[str],
    state: Path | None = None,
    fitter: Callable[..., FitResult] = fit,
) -> FitResult:
    """Fit, then (on rank 0) write the checkpoint, with its resolved config and runtime, and the per-epoch
    curve; log both. Under torchrun every process trains; one writes.

    `state`: fit's per-epoch resumable state. It is removed only once everything here is written and
    logged, so a kill during the checkpoint or the MLflow upload resumes at the end of training.
    `fitter`: `loop.fit`, or a fit of the same signature (the consistency student's)."""
    lead = world()[0] == 0
    if lead:  # fail now, not after the training, when the checkpoint or the epoch state cannot be written
        model_mb = sum(t.numel() * t.element_size() for t in job.model.state_dict().values()) / 2**20
        check_writable(job.checkpoint, job.curve, need_mb=1.1 * model_mb)
        if state is not None:  # weights, best weights, Adam's two moments
            check_writable(state, need_mb=4.4 * model_mb)
    result = fitter(
        job.model,
        train,
        val,
        job.schedule,
        replace(setup, desc=job.checkpoint.stem),
        on_epoch=tracking.log_epoch if lead else None,
        state=state,
        keep_state=True,
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
        config=job.config | {"precision": setup.runtime.precision, "device": str(setup.runtime.device)},
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


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one training stage fits, on which rows, and how its MLflow run is named and described."""

    stage: str  # the MLflow run's stage name: teacher, student, student@1, ..., finetune
    state: str  # the per-epoch resume state's name: .sstl-state/train/<state>.pt (git-ignored)
    job: Job
    train: ImageSet
    run_params: dict[str, Any]
    augment: Augmenter | None = None
    augment_head: bool = True
    feature_cache: Path | None = None
    targets: torch.Tensor | None = None  # soft targets (N, C) for `train`'s rows; None: its labels
    fitter: Callable[..., FitResult] = fit  # or the consistency student's fit, its pool bound
    metrics: dict[str, Any] = field(default_factory=dict)  # logged before training


FEATURES = Path(".sstl-state/features")  # backbone features for phase 1: git-ignored cache, shared with tune


def _new_job(
    cfg: TeacherParams, args: argparse.Namespace, num_classes: int, seed: int, *, config: dict[str, Any]
) -> Job:
    """A freshly built network (seeded) for the teacher or a student, written where argv says."""
    model_cfg = cfg.model()
    return Job(
        build_model(model_cfg, num_classes, seed),
        model_cfg,
        cfg.schedule(),
        args.model,
        args.curve,
        packing=load_packing(args.data),
        config=config,
    )


def teacher_plan(p: Params, args: argparse.Namespace, *, labeled: ImageSet, classes: list[str]) -> Plan:
    """The teacher: the labelled rows, the tuned hyperparameters over params.yaml's teacher keys."""
    tuned = TeacherParams.model_validate({**p.teacher.model_dump(), **read_json(args.tuned)})
    cfg = resolve_weights(tuned, args.pretrain)
    job = _new_job(cfg, args, len(classes), p.seed, config={"teacher": cfg.model_dump(), "seed": p.seed})
    augment = None if cfg.augment is None else augmenter(cfg.augment, int(labeled.images.shape[1]), p.seed)
    return Plan(
        stage="teacher",
        state="teacher",
        job=job,
        train=labeled,
        run_params={"teacher": cfg.model_dump()},
        augment=augment,
        augment_head=cfg.augment is None or cfg.augment.head_phase,
        feature_cache=FEATURES,
    )


def student_plan(p: Params, args: argparse.Namespace, *, labeled: ImageSet, classes: list[str]) -> Plan:
    """A round's student: the labelled rows (their labels) + its teacher's pseudo-labelled rows; or, with
    `student.method: fixmatch`, the labelled rows and the whole pool under the consistency loss."""
    i, rnd = p.round_of(student=args.model.stem)  # models/<name>.pt
    pool = load_split(args.data, "unlabeled", lazy=True)  # only the rows a step reads are read
    rows = read_csv(args.labels)
    pseudo, soft = pseudo_targets(pool, rows, np.load(args.probs))
    student = resolve_weights(p.student, args.pretrain)
    config = {"student": student.model_dump(), "teacher": rnd.teacher, "seed": p.seed}
    job = _new_job(student, args, len(classes), p.seed, config=config)
    plan = Plan(
        stage="student" if i == 0 else f"student@{i}",
        state=rnd.student,
        job=job,
        train=labeled,
        run_params={"teacher": rnd.teacher, "student": p.student.model_dump()},
        augment=augmenter(p.student.augment, int(labeled.images.shape[1]), p.seed),  # per image, then batched
        augment_head=p.student.augment.head_phase,
        feature_cache=FEATURES,
        metrics={"n_labeled": len(labeled), "n_pseudo": len(pseudo)},
    )
    quantile = p.student.consistency.ood_quantile if p.student.method == "fixmatch" else None
    write_csv(args.ood, [], OOD_FIELDS)  # the screen, when on, lists what it drops here
    if p.student.method == "fixmatch":
        chosen = torch.zeros(len(pool), dtype=torch.bool)
        index = torch.tensor([int(r["index"]) for r in rows], dtype=torch.int64)
        targets = torch.zeros((len(pool), len(classes)))
        targets[index], chosen[index] = soft, True
        head = functools.partial(_probe_head, p, labeled, len(classes)) if p.student.consistency.probe_head else None
        fitter = functools.partial(
            fit_consistency,
            pool=Pool(
                images=pool,
                soft=targets,
                chosen=chosen,
                screen=None
                if quantile is None
                else ood_screen(quantile, manifest=args.data / "manifest.csv", out=args.ood),
            ),
            consistency=p.student.consistency,
            head_init=head,
        )
        return replace(plan, fitter=fitter, metrics=plan.metrics | {"n_pool": len(pool)})
    hard = one_hot(labeled.labels, len(classes)).float()  # the labelled rows' targets stay their labels
    return replace(
        plan,
        train=ImageSet.concat(labeled, pseudo),
        targets=torch.cat([hard, soft]) if p.student.pseudo_targets == "soft" else None,
    )


OOD_FIELDS = ("index", "path", "similarity", "threshold")


def ood_screen(
    quantile: float, *, manifest: Path, out: Path, log: Callable[[dict[str, float]], None] = tracking.log_metrics
) -> Screen:
    """The consistency student's pool screen: sstl.pseudo.ood on its starting backbone's features (the
    frozen ImageNet one), calibrated on val. The photos it drops are listed in `out`, their count `log`ged."""

    def screen(pool: torch.Tensor, labelled: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        keep, sims, cut = in_distribution(pool, labelled, val, quantile=quantile)
        dropped = (~keep).nonzero().flatten().tolist()
        paths = split_paths(manifest, "unlabeled", set(dropped))
        rows = [{"index": i, "path": paths[i], "similarity": round(float(sims[i]), 6), "threshold": round(cut, 6)}
                for i in dropped]  # fmt: skip
        write_csv(out, rows, OOD_FIELDS)
        log({"n_ood_dropped": len(rows), "ood_threshold": cut})
        print(f"ood screen: {len(rows)} of {len(keep)} unlabelled photos of no known class -> {out}")
        return keep

    return screen


def _probe_head(p: Params, labeled: ImageSet, num_classes: int, model: Classifier, runtime: Runtime) -> None:
    """The consistency student's head starts as the frozen-feature probe of its backbone (a linear head)."""
    layers = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    if len(layers) != 1:
        return  # an MLP head starts at random
    probe = p.probe
    grid, folds, max_iter = probe.C, probe.folds, probe.max_iter
    fit_probe(
        model, labeled.images, labeled.labels, num_classes=num_classes, grid=grid, folds=folds, seed=p.seed,
        runtime=runtime, max_iter=max_iter,
    )  # fmt: skip


def finetune_plan(p: Params, args: argparse.Namespace, *, labeled: ImageSet, classes: list[str]) -> Plan:
    """The last round's student (`--init`) on the clean labelled rows at a small learning rate."""
    model, meta = load_checkpoint(args.init)
    job = Job(
        model,
        ModelConfig.model_validate(meta["model"]),
        p.finetune.schedule(),
        args.model,
        args.curve,
        packing=load_packing(args.data),
        config={"finetune": p.finetune.model_dump(), "from": str(args.init), "seed": p.seed},
    )
    return Plan(
        stage="finetune", state="finetune", job=job, train=labeled, run_params={"finetune": p.finetune.model_dump()}
    )


PlanFn = Callable[..., Plan]
PLANS: dict[str, PlanFn] = {"teacher": teacher_plan, "student": student_plan, "finetune": finetune_plan}


def run_training(plan: PlanFn, args: argparse.Namespace, p: Params) -> FitResult | None:
    """A training stage's story: read the labelled and val rows, build the plan, fit and save it under
    one MLflow run; the result on rank 0 (None on the other torchrun processes).

    With `data.refit` every stage after the teacher (whose epochs val chooses) trains on val's rows too."""
    runtime = p.runtime("train")
    refit = p.data.refit and plan is not teacher_plan
    labeled, val = load_labelled(args.data, refit=refit), load_split(args.data, "val")
    classes = load_classes(args.data)
    with distributed(runtime) as (rank, _):
        todo = plan(p, args, labeled=labeled, classes=classes)
        run_params = {"seed": p.seed, **runtime.describe(), **todo.run_params}
        with tracking.stage_run(todo.stage, p.mlflow.experiment, run_params, rank):
            if todo.metrics:
                tracking.log_metrics(todo.metrics)
            setup = FitSetup(
                num_classes=len(classes),
                seed=p.seed,
                runtime=runtime,
                augment=todo.augment,
                augment_head=todo.augment_head,
                targets=todo.targets,
                feature_cache=todo.feature_cache,
            )
            state = Path(f".sstl-state/train/{todo.state}.pt")  # per-epoch resume state: git-ignored
            result = train_and_save(todo.job, todo.train, val, setup, classes=classes, state=state, fitter=todo.fitter)
    return result if rank == 0 else None
