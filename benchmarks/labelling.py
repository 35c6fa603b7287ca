"""Labelling queue: 100 extra labels picked by `sstl label-queue`'s strategies vs 100 random picks.

    python benchmarks/labelling.py [--splits 3] [--random-seeds 5] [--budget 100]

On the clothing photos (../shared/datasets/clothing, 10 imbalanced classes): per base split (the
clothing benchmark's layout: a seeded 20 labelled photos per class from train/, the rest of train/
the unlabelled pool, whose true labels this benchmark knows; test/ as test):
1. a linear head (multinomial logistic regression, L-BFGS, L2) on frozen ImageNet
   tf_efficientnet_lite0 features, trained on the 200 base labels;
2. its probabilities over the pool; `budget` photos queued by each strategy with
   `sstl.labelling.rank` (the function `label-queue` calls; diverse gets the pool's backbone
   features, as label-queue's `infer(..., features=True)` gives them), or drawn at random;
3. the picks added with their true labels, the head retrained, test accuracy.
The features are computed once for every photo (decoded as label-queue and predict decode them,
`infer(..., features=True)`) and cached outside the repo. Writes reports/benchmarks/labelling.{md,json}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from clothing import CACHE, unpack  # noqa: E402
from stamp import stamp  # noqa: E402

from sstl.config.model import ModelConfig
from sstl.core.files import write_json, write_text
from sstl.labelling.queue import read_images, report_skip
from sstl.labelling.rank import STRATEGIES, margins, rank
from sstl.models.factory import create_model
from sstl.models.inference import infer
from sstl.runtime.device import Runtime, native_bf16

OUT = ROOT / "reports/benchmarks"
FEATURES = CACHE.parent / "labelling-lite0-features.pt"  # outside the repo, like the unpacked photos
ARCH = "tf_efficientnet_lite0"
PER_CLASS = 20
L2 = 1e-3  # the head's weight decay, fixed beforehand (no tuning on test)


def photos() -> tuple[list[str], list[Path], np.ndarray, list[Path], np.ndarray]:
    """(classes, train photos, their labels, test photos, their labels), sorted by class then name."""
    classes = sorted(p.name for p in (CACHE / "train").iterdir())
    out: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for split, (paths, labels) in out.items():
        for c, name in enumerate(classes):
            found = sorted((CACHE / split / name).glob("*.jpg"))
            paths += found
            labels += [c] * len(found)
    return (classes, out["train"][0], np.array(out["train"][1]), out["test"][0], np.array(out["test"][1]))


def base_split(train: list[Path], labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, pool) indices into `train`: the clothing benchmark's layout (benchmarks/clothing.py
    `layout`: one seeded shuffle per class in class order, the first PER_CLASS labelled)."""
    rng = random.Random(seed)
    labelled, pool = [], []
    for c in range(labels.max() + 1):
        idx = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: train[i])
        rng.shuffle(idx)
        labelled += idx[:PER_CLASS]
        pool += idx[PER_CLASS:]
    return np.array(sorted(labelled)), np.array(sorted(pool))


def features(paths: list[Path], runtime: Runtime) -> tuple[torch.Tensor, float, bool]:
    """Backbone features (N, D) of every photo, decoded as label-queue decodes them; cached.
    (features, seconds they took to compute, whether this run read them from the cache)."""
    key = [str(p.relative_to(CACHE)) for p in paths]
    if FEATURES.is_file():
        saved = torch.load(FEATURES, weights_only=False)
        if saved["paths"] == key and saved["precision"] == runtime.precision:
            return saved["features"], saved["seconds"], True
    model = create_model(ModelConfig(arch=ARCH, weights="imagenet", head_layers=0), 10)
    size, interpolation = model.data.input_size, model.data.interpolation
    start, parts = time.perf_counter(), []
    for a in range(0, len(paths), 256):
        images, readable = read_images(paths[a : a + 256], size, interpolation, report_skip)
        assert len(readable) == len(paths[a : a + 256]), "every clothing photo is readable"
        parts.append(infer(model, torch.from_numpy(images), runtime=runtime, features=True, desc="features"))
        print(f"features: {a + len(readable)}/{len(paths)}", flush=True)
    out, seconds = torch.cat(parts), time.perf_counter() - start
    FEATURES.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"paths": key, "precision": runtime.precision, "features": out, "seconds": seconds}, FEATURES)
    return out, seconds, False


def train_head(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> nn.Linear:
    """Multinomial logistic regression on standardised features: L-BFGS to convergence, L2 = L2."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + L2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def probabilities(head: nn.Linear, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(x).softmax(1).numpy()


def one_split(seed: int, data: dict, args: argparse.Namespace) -> list[dict]:
    """Base accuracy, then each strategy's and each random draw's accuracy after `budget` more labels."""
    x, y, xt, yt, c = data["x"], data["y"], data["xt"], data["yt"], data["classes"]
    labelled, pool = base_split(data["train"], y.numpy(), seed)
    base = train_head(x[labelled], y[labelled], c)
    probs = probabilities(base, x[pool])
    pool_feats = x[pool].numpy()
    rows = [{"split": seed, "way": "base (no extra labels)", "accuracy": accuracy(base, xt, yt), "extra": 0}]
    picks: dict[str, np.ndarray] = {}
    for strategy in STRATEGIES:
        picks[strategy] = rank(probs, strategy, args.budget, features=lambda idx: pool_feats[idx], seed=seed)
    for r in range(args.random_seeds):
        picks[f"random #{r}"] = np.random.default_rng(1000 * seed + r).choice(len(pool), args.budget, replace=False)
    for way, chosen in picks.items():
        train = np.concatenate([labelled, pool[chosen]])
        head = train_head(x[train], y[train], c)
        truth = y[pool[chosen]].numpy()
        rows.append(
            {
                "split": seed,
                "way": way,
                "accuracy": accuracy(head, xt, yt),
                "extra": len(chosen),
                "base_wrong_on_picks": float((probs[chosen].argmax(1) != truth).mean()),
                "mean_margin_of_picks": float(margins(probs[chosen]).mean()),
                "classes_in_picks": int(len(np.unique(truth))),
            }
        )
        print(rows[-1], flush=True)
    return rows


def random_mean(rows: list[dict], split: int) -> float:
    """Mean test accuracy of the random draws on one base split: what a strategy is paired against."""
    return statistics.mean(r["accuracy"] for r in rows if r["split"] == split and r["way"].startswith("random"))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std of test accuracy per way (random: over splits x seeds), and the gain over base."""

    def group(r: dict) -> str:
        return "random" if r["way"].startswith("random") else r["way"]

    ways = list(dict.fromkeys(group(r) for r in rows))
    base = {r["split"]: r["accuracy"] for r in rows if r["extra"] == 0}
    out = []
    for way in ways:
        mine = [r for r in rows if group(r) == way]
        acc = [r["accuracy"] for r in mine]
        gain = [r["accuracy"] - base[r["split"]] for r in mine]
        entry = {
            "way": way,
            "runs": len(mine),
            "accuracy_mean": round(statistics.mean(acc), 4),
            "accuracy_std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
            "gain_mean": round(statistics.mean(gain), 4),
        }
        if mine[0]["extra"] and way != "random":
            diff = [r["accuracy"] - random_mean(rows, r["split"]) for r in mine]
            entry["vs_random_mean"] = round(statistics.mean(diff), 4)
            entry["vs_random_se"] = round(statistics.stdev(diff) / len(diff) ** 0.5, 4) if len(diff) > 1 else 0.0
            entry["splits_above_random"] = sum(d > 0 for d in diff)
        if mine[0]["extra"]:
            entry["base_wrong_on_picks"] = round(statistics.mean(r["base_wrong_on_picks"] for r in mine), 3)
            entry["classes_in_picks"] = round(statistics.mean(r["classes_in_picks"] for r in mine), 1)
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=10, help="base splits (seeds 0..splits-1; 0 = clothing.py's)")
    ap.add_argument("--random-seeds", type=int, default=5, help="random draws per split")
    ap.add_argument("--budget", type=int, default=100, help="extra labels")
    args = ap.parse_args()
    start = time.perf_counter()
    unpack()
    runtime = Runtime(torch.device("cpu"), "bf16" if native_bf16() else "fp32")
    classes, train, y, test, yt = photos()
    feats, feature_seconds, cached = features(train + test, runtime)
    feats = feats.float()
    mean, std = feats[: len(train)].mean(0), feats[: len(train)].std(0).clamp(min=1e-6)  # no labels used
    feats = (feats - mean) / std
    data = {
        "x": feats[: len(train)],
        "y": torch.from_numpy(y),
        "xt": feats[len(train) :],
        "yt": torch.from_numpy(yt),
        "classes": len(classes),
        "train": train,
    }
    rows = [row for seed in range(args.splits) for row in one_split(seed, data, args)]
    record = {
        **stamp(),
        "runtime": runtime.describe(),
        "protocol": {
            "backbone": f"{ARCH}, ImageNet weights, frozen; features once for every photo ({runtime.precision})",
            "head": f"linear (multinomial logistic regression), standardised features, L-BFGS, L2 {L2}",
            "base_labels": f"{PER_CLASS} per class ({PER_CLASS * len(classes)}), seeded as benchmarks/clothing.py",
            "base_labels_n": PER_CLASS * len(classes),
            "pool": len(train) - PER_CLASS * len(classes),
            "test": len(test),
            "budget": args.budget,
            "splits": args.splits,
            "random_seeds_per_split": args.random_seeds,
            "diverse_candidates": "5 x budget smallest margins, k-means on their features, seed = split",
        },
        "feature_seconds": round(feature_seconds, 1),
        "features_from_cache": cached,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summarise(rows),
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "labelling.json", record)
    write_text(OUT / "labelling.md", render(record))
    print((OUT / "labelling.md").read_text())


def render(r: dict) -> str:
    p = r["protocol"]
    lines = [
        "# Labelling queue: which 100 photos to label next",
        "",
        f"`python benchmarks/labelling.py` on the clothing photos (10 imbalanced classes). Per base split: "
        f"{p['base_labels']}; the rest of train/ is the unlabelled pool ({p['pool']} photos, true labels known "
        f"to the benchmark only); test/ ({p['test']} photos) measures. A head trained on the base labels scores "
        f"the pool; {p['budget']} photos are picked by each `sstl label-queue` strategy (`sstl.labelling.rank`, "
        f"the function the command calls) or at random, added with their true labels, the head retrained.",
        "",
        f"Protocol (for speed; the pipeline fine-tunes more): backbone {p['backbone']}; head {p['head']}. "
        f"{p['splits']} base splits; random: {p['random_seeds_per_split']} draws per split. Diverse: "
        f"{p['diverse_candidates']}.",
        "",
        f"Machine: {r['machine']}; date {r['date']}; commit {r['commit']}; {r['environment']}. "
        f"Features of the {p['pool'] + p['base_labels_n'] + p['test']} photos: {r['feature_seconds']} s "
        f"(once{', read from the cache in this run' if r['features_from_cache'] else ''}); "
        f"this run {r['seconds']} s.",
        "",
        f"| picks ({p['budget']} extra labels) | runs | test accuracy (mean ± std) | gain over base | "
        "minus random, same split (mean ± s.e.) | splits above random | base model wrong on the picks | "
        "classes among the picks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["summary"]:
        paired = f"{s['vs_random_mean']:+.4f} ± {s['vs_random_se']:.4f}" if "vs_random_mean" in s else "-"
        above = f"{s['splits_above_random']} of {s['runs']}" if "splits_above_random" in s else "-"
        lines.append(
            f"| {s['way']} | {s['runs']} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | "
            f"{s['gain_mean']:+.4f} | {paired} | {above} | {s.get('base_wrong_on_picks', '-')} | "
            f"{s.get('classes_in_picks', '-')} |"
        )
    lines += [
        "",
        f'"minus random": a strategy\'s accuracy minus the mean of the random draws on the same base split, '
        f"mean ± standard error over the splits. One test photo is {1 / p['test']:.4f} of accuracy. "
        '"Base model wrong on the picks": the share of the picks the base head misclassified.',
    ]
    lines += ["", "Per split (test accuracy):", "", "| split | " + " | ".join(STRATEGIES) + " | random (mean) | base |"]
    lines.append("|---" * (len(STRATEGIES) + 3) + "|")
    for split in sorted({row["split"] for row in r["rows"]}):
        mine = {row["way"]: row["accuracy"] for row in r["rows"] if row["split"] == split}
        rand = statistics.mean(v for k, v in mine.items() if k.startswith("random"))
        cells = [f"{mine[s]:.4f}" for s in STRATEGIES] + [f"{rand:.4f}", f"{mine['base (no extra labels)']:.4f}"]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
