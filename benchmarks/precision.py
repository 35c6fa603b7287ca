"""fp32 vs bf16 autocast on CIFAR-10 (4,000 labels): the same teacher, several seeds, accuracy and speed.

    python benchmarks/precision.py [--seeds 0 1 2] [--epochs 30]

The profile's teacher (convnet_s, fixed hyperparameters: no tuning, so only the precision differs)
trained in each precision with each seed, and each trained model scored in each precision; test
and test-add accuracy, training and inference images per second. Answers whether bf16 keeps
accuracy, in training and in inference: compare the gaps with the spread between seeds.
Writes reports/benchmarks/precision.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sstl.train.setup import FitSetup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cifar10_folder import CACHE, SHARED, layout, unpack  # noqa: E402
from stamp import stamp  # noqa: E402

from sstl.config.data import CorruptConfig
from sstl.config.model import ModelConfig
from sstl.core.files import write_json, write_text
from sstl.data.dataset import load_split
from sstl.runtime.device import Runtime, native_bf16

PRECISIONS = ("fp32", "bf16")  # the CPU precisions compared (fp16 needs a GPU)
from sstl.config.train import TrainConfig
from sstl.data.prepare import prepare_folder
from sstl.pipeline.evaluate import evaluate_model
from sstl.pipeline.train import build_model
from sstl.train.loop import fit

MODEL = ModelConfig(arch="convnet_s", head_layers=0, dropout=0.2)  # benchmarks/cifar10.yaml's teacher
CORRUPT = CorruptConfig(kinds=["gaussian_blur", "gaussian_noise", "jpeg", "contrast"], severity=3, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the JSON table")
    args = ap.parse_args()
    out = ROOT / "reports/benchmarks"
    if args.render:
        write_text(out / "precision.md", render(json.loads((out / "precision.json").read_text())))
        return
    unpack(SHARED, CACHE)
    folder, prepared = CACHE.parent / "cifar10-400", CACHE.parent / "cifar10-400-prepared-c"
    layout(CACHE, folder, 400, seed=0)
    if not (prepared / "manifest.csv").is_file():
        prepare_folder(folder, prepared, image_size=32, val_fraction=0.1, seed=42, corrupt_test=CORRUPT)
    labeled, val, test, test_add = (load_split(prepared, s) for s in ("labeled", "val", "test", "test-add"))
    schedule = TrainConfig(
        head_epochs=0,
        epochs=args.epochs,
        finetune_lr=2e-3,
        unfreeze_blocks=4,
        batch_size=128,
        patience=5,
        plateau_patience=2,
    )

    records = []
    for seed in args.seeds:
        for train_precision in PRECISIONS:
            model = build_model(MODEL, 10, seed)
            desc = f"{train_precision} seed {seed}"
            train_rt = Runtime(torch.device("cpu"), train_precision)
            result = fit(
                model, labeled, val, schedule, FitSetup(num_classes=10, seed=seed, desc=desc, runtime=train_rt)
            )
            # each model scored in both precisions: what bf16 costs in training vs in inference alone
            for infer_precision in PRECISIONS:
                start = time.perf_counter()
                acc = {
                    name: evaluate_model(
                        model, d, num_classes=10, bins=15, runtime=Runtime(torch.device("cpu"), infer_precision)
                    )["accuracy"]
                    for name, d in (("test", test), ("test-add", test_add))
                }
                infer_speed = (len(test) + len(test_add)) / (time.perf_counter() - start)
                records.append(
                    {
                        "train_precision": train_precision,
                        "infer_precision": infer_precision,
                        "seed": seed,
                        "test_accuracy": round(acc["test"], 4),
                        "test_add_accuracy": round(acc["test-add"], 4),
                        "epochs_run": len(result.history),
                        "train_images_per_second": round(result.images_per_second, 1),
                        "infer_images_per_second": round(infer_speed, 1),
                    }
                )
                print(records[-1], flush=True)

    meta = {
        **stamp(),
        "arch": MODEL.arch,
        "labels": 4000,
        "native_bf16": native_bf16(),
        "threads": torch.get_num_threads(),
    }
    records = [meta | r for r in records]
    write_json(out / "precision.json", records)
    write_text(out / "precision.md", render(records))
    print(render(records))


def mean_sd(records: list[dict], key: str) -> str:
    xs = [r[key] for r in records]
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def render(records: list[dict]) -> str:
    m = records[0]
    lines = [
        "# fp32 vs bf16 autocast: the CIFAR-10 teacher (4,000 labels)",
        "",
        f"`python benchmarks/precision.py` — {m['arch']} with the profile's fixed teacher hyperparameters, "
        f"seeds {sorted({r['seed'] for r in records})}; native bf16: {m['native_bf16']}; {m['machine']}; "
        f"{m['date']}; commit {m['commit']}.",
        "",
        "| train | infer | seed | test acc | test-add acc | epochs | train img/s | infer img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['train_precision']} | {r['infer_precision']} | {r['seed']} | {r['test_accuracy']:.4f} | "
        f"{r['test_add_accuracy']:.4f} | {r['epochs_run']} | {r['train_images_per_second']:.0f} | "
        f"{r['infer_images_per_second']:.0f} |"
        for r in records
    ]
    lines += [
        "",
        "| train | infer | test acc, mean ± sd | test-add acc, mean ± sd | train img/s | infer img/s |",
        "|---|---|---|---|---|---|",
    ]
    for t in PRECISIONS:
        for i in PRECISIONS:
            rs = [r for r in records if (r["train_precision"], r["infer_precision"]) == (t, i)]
            speed = {
                k: statistics.mean(r[k] for r in rs) for k in ("train_images_per_second", "infer_images_per_second")
            }
            lines.append(
                f"| {t} | {i} | {mean_sd(rs, 'test_accuracy')} | {mean_sd(rs, 'test_add_accuracy')} | "
                f"{speed['train_images_per_second']:.0f} | {speed['infer_images_per_second']:.0f} |"
            )

    def gap(train: str, infer: str, key: str) -> float:  # points vs fp32/fp32, mean over seeds
        mean = {
            (t, i): statistics.mean(r[key] for r in records if (r["train_precision"], r["infer_precision"]) == (t, i))
            for t, i in ((train, infer), ("fp32", "fp32"))
        }
        return 100 * (mean[(train, infer)] - mean[("fp32", "fp32")])

    lines += [
        "",
        f"bf16 inference on fp32-trained models: {gap('fp32', 'bf16', 'test_accuracy'):+.2f} points on test, "
        f"{gap('fp32', 'bf16', 'test_add_accuracy'):+.2f} on test-add. bf16 training (scored in fp32): "
        f"{gap('bf16', 'fp32', 'test_accuracy'):+.2f} on test, {gap('bf16', 'fp32', 'test_add_accuracy'):+.2f} "
        "on test-add. Seeds vary the initial weights and the batch order; the data and split are fixed.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
