"""Rotation pretraining on CIFAR-10 (4,000 labels): scratch vs frozen-backbone probe vs fine-tuned.

    python benchmarks/pretrain_compare.py [--pretrain-images 20000] [--pretrain-epochs 5]

As seed 002 does on Fashion-MNIST: the same small CNN trained (a) from scratch on the labels,
(b) as a linear probe on the frozen rotation-pretrained backbone, (c) fine-tuned from it.
Writes reports/benchmarks/pretrain.{md,json} with machine, date and commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sstl.runtime.device import CPU
from sstl.train.setup import FitSetup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cifar10_folder import CACHE, SHARED, layout, unpack  # noqa: E402
from stamp import stamp  # noqa: E402

from sstl.config.model import ModelConfig
from sstl.config.train import PretrainConfig, TrainConfig
from sstl.core.files import write_json, write_text
from sstl.data.dataset import load_images, load_split
from sstl.data.prepare import prepare_folder
from sstl.models.checkpoint import save_checkpoint
from sstl.pipeline.evaluate import evaluate_model
from sstl.pipeline.train import build_model
from sstl.train.loop import fit
from sstl.train.pretrain import ROTATIONS, pretrain_rotation

ARCH = "convnet_s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-images", type=int, default=20000)
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    unpack(SHARED, CACHE)
    folder, prepared = CACHE.parent / "cifar10-400", CACHE.parent / "cifar10-400-prepared"
    layout(CACHE, folder, 400, seed=0)
    if not (prepared / "manifest.csv").is_file():
        prepare_folder(folder, prepared, image_size=32, val_fraction=0.1, seed=42)
    labeled, val, test = (load_split(prepared, s) for s in ("labeled", "val", "test"))

    t0 = time.perf_counter()
    cfg = PretrainConfig(enabled=True, arch=ARCH, epochs=args.pretrain_epochs, max_images=args.pretrain_images)
    model, model_cfg, result = pretrain_rotation(load_images(prepared, "unlabeled"), cfg, seed=42, runtime=CPU)
    weights = prepared.parent / "cifar10-rotation-pretrain.pt"
    save_checkpoint(weights, model, model_cfg, list(ROTATIONS), 32)
    pretrain_seconds = time.perf_counter() - t0
    print(f"pretrain: rotation val acc {result.best_val_acc:.4f} in {pretrain_seconds:.0f} s", flush=True)

    settings = {  # name: (weights, head_epochs (frozen backbone), epochs (all blocks))
        "scratch": ("none", 0, args.epochs),
        "frozen probe": (str(weights), args.epochs, 0),
        "fine-tuned": (str(weights), 5, args.epochs),
    }
    records = []
    for name, (w, head_epochs, epochs) in settings.items():
        start = time.perf_counter()
        net = build_model(ModelConfig(arch=ARCH, weights=w, head_layers=0, dropout=0.2), 10, seed=42)
        schedule = TrainConfig(
            head_epochs=head_epochs,
            epochs=epochs,
            lr=3e-3,
            finetune_lr=3e-3,
            unfreeze_blocks=1000,
            batch_size=128,
            patience=5,
            plateau_patience=2,
        )
        fit(net, labeled, val, schedule, FitSetup(num_classes=10, seed=42, desc=name, runtime=CPU))
        acc = evaluate_model(net, test, num_classes=10, bins=15, runtime=CPU)["accuracy"]
        records.append({"setting": name, "test_accuracy": round(acc, 4), "seconds": round(time.perf_counter() - start)})
        print(records[-1], flush=True)

    meta = {
        **stamp(),
        "arch": ARCH,
        "labels": 4000,
        "pretrain_images": args.pretrain_images,
        "pretrain_epochs": args.pretrain_epochs,
        "rotation_val_accuracy": round(result.best_val_acc, 4),
        "pretrain_seconds": round(pretrain_seconds),
        "threads": torch.get_num_threads(),
    }
    records = [meta | r for r in records]
    out = ROOT / "reports/benchmarks"
    write_json(out / "pretrain.json", records)
    lines = [
        "# Rotation pretraining on CIFAR-10, 4,000 labels",
        "",
        f"`python benchmarks/pretrain_compare.py` — {ARCH}; rotation pretext on {args.pretrain_images} unlabelled "
        f"images x 4 rotations, {args.pretrain_epochs} epochs ({meta['pretrain_seconds']} s, rotation val acc "
        f"{meta['rotation_val_accuracy']}); {meta['machine']}; {meta['date']}; commit {meta['commit']}.",
        "",
        "| setting | test accuracy | train seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['setting']} | {r['test_accuracy']:.4f} | {r['seconds']} |" for r in records]
    write_text(out / "pretrain.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
