"""The probe stage's story: which backbones to probe, fitting each on the labelled rows the models learn from, and
the files it writes (one checkpoint per backbone, one report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from sstl.config.model import ModelConfig
from sstl.core.files import atomic_folder, write_json
from sstl.data.dataset import load_classes, load_labelled, load_packing
from sstl.eval.probe import fit_probe
from sstl.models.checkpoint import save_checkpoint
from sstl.models.factory import create_model
from sstl.models.weights import resolve_weights
from sstl.params import Params
from sstl.track import tracking

NAMES = {"teacher": "probe", "student": "probe_student"}  # role -> the probe's name in metrics.json


def backbones(p: Params, pretrain: Path) -> dict[str, ModelConfig]:
    """{probe name: linear-head ModelConfig} for each distinct (arch, weights) of teacher, student and probe.extra."""
    candidates = []
    for role, cfg in (("teacher", p.teacher), ("student", p.student)):
        model = resolve_weights(cfg, pretrain).model()
        candidates.append(
            (NAMES[role], ModelConfig(arch=model.arch, weights=model.weights, widths=model.widths, resize=model.resize))
        )
    candidates += [(f"probe_{arch}", ModelConfig(arch=arch, weights="imagenet")) for arch in p.probe.extra]
    found: dict[str, ModelConfig] = {}
    for name, probe in candidates:  # one probe per backbone, the first name it comes under
        if all((probe.arch, probe.weights) != (f.arch, f.weights) for f in found.values()):
            found[name] = probe.model_copy(update={"head_layers": 0, "dropout": 0.0})
    return found


def run_probes(p: Params, args: argparse.Namespace) -> dict[str, Any]:
    """Fit every probe on the labelled rows the model to use trains on (the teacher's; with `data.refit`
    labeled + val, the students'); write args.out/<name>.pt and the report; the report's content."""
    report: dict[str, Any] = {"enabled": p.probe.enabled, "probes": {}}
    runtime = p.runtime("infer")
    labeled = load_labelled(args.data, refit=p.data.refit)  # as sstl.pipeline.train.run_training reads them
    classes = load_classes(args.data)
    packing = load_packing(args.data)
    with atomic_folder(args.out) as tmp:
        if not p.probe.enabled:
            write_json(args.report, report)
            return report
        for name, cfg in backbones(p, args.pretrain).items():
            torch.manual_seed(p.seed)  # weights none: the random features are the seed's
            model = create_model(cfg, len(classes))
            with tracking.stage_run(
                name,
                p.mlflow.experiment,
                {"seed": p.seed, **runtime.describe(), "probe": p.probe.model_dump(), "backbone": cfg.model_dump()},
            ):
                choice = fit_probe(
                    model,
                    labeled.images,
                    labeled.labels,
                    num_classes=len(classes),
                    grid=p.probe.C,
                    folds=p.probe.folds,
                    seed=p.seed,
                    runtime=runtime,
                    max_iter=p.probe.max_iter,
                )
                splits = ["labeled", "val"] if p.data.refit else ["labeled"]
                record = {
                    "arch": cfg.arch, "weights": cfg.weights, **choice.as_dict(), "splits": splits,
                    "paths": labeled.paths,
                }  # fmt: skip
                save_checkpoint(
                    tmp / f"{name}.pt",
                    model.cpu(),
                    cfg,
                    classes,
                    int(labeled.images.shape[1]),
                    config={"probe": p.probe.model_dump(), "seed": p.seed},
                    probe={k: v for k, v in record.items() if k != "paths"},
                    interpolation=packing.get("interpolation", model.data.interpolation),
                )
                tracking.log_metrics({"C": choice.C, "cv_accuracy": max(choice.cv_accuracy.values(), default=0.0)})
            report["probes"][name] = record
        write_json(args.report, report)
    return report
