"""Clothing benchmark (real photos, 10 imbalanced classes): the photo profile, 20 labels per class.

    python benchmarks/clothing.py                 # pipeline + upper bound, ~25 min on 2 CPU cores
    python benchmarks/clothing.py --skip-upper    # the pipeline only

Lays `../shared/datasets/clothing` out as an ordinary sstl folder (symlinks): 20 seeded labelled
photos per class from train/, the rest of train/ as the unlabelled pool under neutral names (labels
withheld), test/ as test, validation/ as test-add. Runs `dvc exp run --temp` with the photo profile
(src/sstl/profiles/photos.yaml) plus benchmarks/clothing.yaml, then trains the upper bound: the
teacher's backbone and recipe, supervised on all 3,068 train labels. Figures, wall time and peak
memory per stage go to reports/benchmarks/clothing.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from sstl.train.setup import FitSetup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cifar10 import hydra  # noqa: E402
from cifar10_folder import link  # noqa: E402
from stamp import stamp  # noqa: E402

from sstl.core.files import write_json, write_text
from sstl.params import PROFILES, REPLACED, apply_profile, parse_params  # noqa: E402
from sstl.track.tracking import flatten

SHARED = ROOT.parent / "shared" / "datasets" / "clothing" / "clothing.tar"
CACHE = Path.home() / ".cache" / "sstl-data" / "clothing"
OUT_JSON = ROOT / "reports/benchmarks/clothing.json"
OUT_MD = ROOT / "reports/benchmarks/clothing.md"
OOD_JSON = ROOT / "reports/benchmarks/clothing-ood.json"
OOD_MD = ROOT / "reports/benchmarks/clothing-ood.md"
STAGES = ("prepare", "tune", "probe", "probe_student", "teacher", "pseudolabel", "student", "finetune", "evaluate")


def unpack() -> None:
    if (CACHE / "train").is_dir():
        return
    if not SHARED.is_file():
        raise SystemExit(f"error: {SHARED} not found: the clothing archive is expected in ../shared/datasets/clothing")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SHARED) as tar:
        tar.extractall(CACHE, filter="data")


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
CLOTHING_SPLITS = (("test", "test"), ("validation", "test-add"))  # the source's folder -> the sstl split


def photos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def layout(
    out: Path,
    per_class: int,
    seed: int,
    *,
    all_labels: bool = False,
    foreign: frozenset[str] = frozenset(),
    source: Path = CACHE,
    splits: tuple[tuple[str, str], ...] = CLOTHING_SPLITS,
) -> dict[str, int]:
    """The sstl folder from `source`'s train/<class>/ and its evaluation folders (`splits`): labeled/
    (per_class seeded photos per class, or all of train/), unlabeled/, test/, test-add/. `foreign` classes
    are left out of every labelled and evaluation split and their train photos all go to the pool:
    unlabelled photos of no class the teacher knows."""
    rng = random.Random(seed)
    counts = {"labeled": 0, "unlabeled": 0, "foreign_in_pool": 0} | {target: 0 for _, target in splits}
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    (out / "unlabeled").mkdir(parents=True)  # empty for the all-labels upper bound
    for cls in sorted(p.name for p in (source / "train").iterdir()):
        photos = photos_in(source / "train" / cls)
        rng.shuffle(photos)
        if cls in foreign:
            for src in photos:
                _link(src, out / "unlabeled" / (hashlib.sha256(src.name.encode()).hexdigest()[:16] + src.suffix))
            counts["unlabeled"] += len(photos)
            counts["foreign_in_pool"] += len(photos)
            continue
        chosen = photos if all_labels else photos[:per_class]
        for src in chosen:
            _link(src, out / "labeled" / cls / src.name)
            counts["labeled"] += 1
        # the all-labels folder's pool: a few of its labelled photos (prepare needs a pool; the upper bound
        # trains on labeled/ only)
        for src in photos[:3] if all_labels else photos[per_class:]:
            neutral = hashlib.sha256(src.name.encode()).hexdigest()[:16] + src.suffix  # no class in the name
            _link(src, out / "unlabeled" / neutral)
            counts["unlabeled"] += 1
        for split, target in splits:
            for src in photos_in(source / split / cls):
                _link(src, out / target / cls / src.name)
                counts[target] += 1
    return counts


def _link(src: Path, dst: Path) -> None:
    if dst.exists():  # two source photos under one neutral name: the layout would lose one silently
        raise SystemExit(f"error: {dst} is laid out twice (from {src} too): rename one of the source photos")
    link(src, dst)


def overlay(raw: dict, extra: Path) -> dict:
    """`raw` with benchmarks/clothing.yaml's sections laid over it, key by key."""
    for section, values in (yaml.safe_load(extra.read_text()) or {}).items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def profile_overrides(folder: Path, extra: Path) -> list[str]:
    """The photo profile then benchmarks/clothing.yaml as `dvc exp run -S` overrides (tune.space replaced whole)."""
    raw = overlay(yaml.safe_load((PROFILES / "photos.yaml").read_text()), extra)
    out: list[str] = []
    for key in REPLACED:
        section, name = key.split(".")
        if name in raw.get(section, {}):
            out += [f"~{key}", f"+{key}={hydra(raw[section].pop(name))}"]
    return out + [f"{k}={hydra(v)}" for k, v in flatten(raw).items()] + [f"data.folder={folder}"]


def collect(pipeline: str) -> dict:
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["sstl"], filter_string=f"tags.`sstl.pipeline` = '{pipeline}'", output_format="list"
    )
    by_stage = {r.data.tags.get("sstl.stage"): r for r in runs if r.data.tags.get("sstl.kind") == "stage"}
    stages = {
        s: {
            "seconds": round(r.data.metrics.get("stage_seconds", float("nan")), 1),
            "peak_rss_mb": round(r.data.metrics.get("peak_rss_mb", 0)),
            "device": r.data.params.get("device_name", "cpu"),
        }
        for s, r in by_stage.items()
    }
    started = min(r.info.start_time for r in by_stage.values())
    ended = max(r.info.end_time or r.info.start_time for r in by_stage.values())
    ev = by_stage["evaluate"].data.metrics
    extra = sorted({k.split(".")[0] for k in ev if k.startswith("probe_") and k.split(".")[0] != "probe_student"})
    models = {
        m: {"test": ev.get(f"{m}.test.accuracy"), "test_add": ev.get(f"{m}.test-add.accuracy")}
        for m in ("probe", "probe_student", *extra, "teacher", "student", "finetuned")  # extra: probe.extra's
        if f"{m}.test.accuracy" in ev
    }
    return {
        "stages": stages,
        "models": models,
        "use": by_stage["evaluate"].data.tags.get("sstl.use"),
        "stage_span_seconds": round((ended - started) / 1000, 1),  # first stage's start to the last one's end
    }


def upper_bound(folder: Path, extra: Path) -> dict:
    """The teacher's backbone and recipe (profile defaults, no tuning) on all train labels, in-process."""
    from sstl.data.dataset import load_classes, load_split
    from sstl.data.prepare import prepare_folder
    from sstl.pipeline.evaluate import evaluate_model
    from sstl.pipeline.train import build_model
    from sstl.train.loop import fit

    raw = overlay(apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()), "photos"), extra)
    raw["data"]["neardup"] = {"enabled": False}
    p = parse_params(raw)
    runtime = p.runtime("train")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        prepare_folder(
            folder,
            prepared,
            image_size=p.image_size(),
            val_fraction=p.data.val_fraction,
            seed=p.seed,
            interpolation=p.interpolation(),
        )
        classes = load_classes(prepared)
        labeled, val = load_split(prepared, "labeled"), load_split(prepared, "val")
        model = build_model(p.teacher.model(), len(classes), p.seed)
        fit(model, labeled, val, p.teacher.schedule(), FitSetup(num_classes=len(classes), seed=p.seed, runtime=runtime))
        out = {
            split: evaluate_model(
                model, load_split(prepared, split), num_classes=len(classes), bins=15, runtime=p.runtime("infer")
            )["accuracy"]
            for split in ("test", "test-add")
        }
    return {
        "arch": p.teacher.arch,
        "n_train": len(labeled),
        "n_val": len(val),
        "test": out["test"],
        "test_add": out["test-add"],
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def rows(models: dict, names: dict[str, str]) -> list[tuple[str, str]]:
    """[(model, its row's label)] of `models` in table order: the probes of `names`, then probe.extra's
    probe_<arch> (labelled here), then the rest of `names` (teacher, students)."""
    extra = {
        k: f"baseline: frozen {k.removeprefix('probe_')} + logistic regression (probe.extra; same labels and CV)"
        for k in models
        if k.startswith("probe_") and k not in names
    }
    probes = {k: v for k, v in names.items() if k.startswith("probe")}
    return [(k, label) for k, label in (probes | extra | names).items() if k in models]


def render(r: dict) -> str:
    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "—"

    m = r["models"]
    foreign = r.get("foreign") or []
    title = "# Clothing benchmark: real photos, 20 labels per class"
    if foreign:
        title += f", {r['counts']['foreign_in_pool']} photos of no known class in the pool ({', '.join(foreign)})"
    lines = [
        title,
        "",
        "`python benchmarks/clothing.py` — photo profile (`src/sstl/profiles/photos.yaml`) + "
        f"`{r.get('extra', 'benchmarks/clothing.yaml')}`; "
        f"{r['counts']['labeled']} labelled photos (val split off them), {r['counts']['unlabeled']} unlabelled, "
        f"test {r['counts']['test']}, test-add (the dataset's validation/) {r['counts']['test-add']}.",
        f"Machine: {r['machine']}; date {r['date']}; commit {r['commit']}; device {r['device']}; "
        f"torch {r['torch']}, timm {r['timm']}.",
        "",
        "| model | test acc | test-add acc |",
        "|---|---|---|",
    ]
    names = {
        "probe": "baseline: frozen Lite0 + logistic regression (the teacher's labels, C by 5-fold CV)",
        "probe_student": "baseline: frozen Lite2 + logistic regression (same labels and CV)",
        "teacher": "teacher (Lite0, 20 labels/class)",
        "student": "student (Lite2, consistency on the whole pool)"
        if r.get("student_method") == "fixmatch"
        else "student (Lite2, + pseudo-labels)",
        "finetuned": "fine-tuned student",
    }
    for k, name in rows(m, names):
        use = " **(model to use)**" if k == r.get("use") else ""
        lines.append(f"| {name}{use} | {f(m[k]['test'])} | {f(m[k]['test_add'])} |")
    ub = r.get("upper_bound")
    if ub:
        at = f" (measured at commit {ub['commit'][:7]})" if ub.get("commit", r["commit"]) != r["commit"] else ""
        lines.append(
            f"| upper bound: {ub['arch']}, all {ub['n_train'] + ub['n_val']} train labels{at} | "
            f"{f(ub['test'])} | {f(ub['test_add'])} |"
        )
    lines += [
        "",
        f"Whole pipeline: {r['pipeline_seconds'] / 60:.1f} min wall.",
        "",
        "| stage | seconds | peak RSS MB |",
        "|---|---|---|",
    ]
    for s in STAGES:
        if s in r["stages"]:
            lines.append(f"| {s} | {r['stages'][s]['seconds']} | {r['stages'][s]['peak_rss_mb']} |")
    if ub:
        lines.append(f"| upper bound (prepare + train + evaluate) | {ub['seconds']} | {ub['peak_rss_mb']} |")
    notes = ROOT / "benchmarks/clothing-tried.md"
    if foreign:
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n" + ("\n" + notes.read_text() if notes.is_file() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description="clothing benchmark (real photos)")
    ap.add_argument("--labels-per-class", type=int, default=20)
    ap.add_argument("--extra", type=Path, default=ROOT / "benchmarks/clothing.yaml", help="overrides on the profile")
    ap.add_argument("--skip-upper", action="store_true", help="skip the all-labels upper bound")
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the JSON")
    ap.add_argument("--upper-only", action="store_true", help="only the upper bound, added to the JSON's pipeline run")
    ap.add_argument(
        "--foreign",
        default="",
        help="comma-separated classes left out of the labels and the tests, their photos all in the pool (the "
        "out-of-class variant: t-shirt,hat puts 918 photos of no known class in a pool of 2,908, 32%%); writes "
        "reports/benchmarks/clothing-ood.{md,json}, no upper bound",
    )
    args = ap.parse_args()
    foreign = frozenset(c for c in args.foreign.split(",") if c)
    out_json, out_md = (OOD_JSON, OOD_MD) if foreign else (OUT_JSON, OUT_MD)
    if args.render:
        write_text(OUT_MD, render(json.loads(OUT_JSON.read_text())))
        return
    if args.upper_only:
        unpack()
        record = json.loads(OUT_JSON.read_text())
        add_upper_bound(record, args.extra)
        return
    import timm
    import torch

    unpack()
    folder = CACHE.parent / f"clothing-{args.labels_per_class}{'-ood' if foreign else ''}"
    counts = layout(folder, args.labels_per_class, seed=0, foreign=foreign)
    print(counts)
    record = run_pipeline(folder, args.extra, label=f"clothing-{args.labels_per_class}")
    record["counts"] = counts
    record["torch"], record["timm"] = torch.__version__, timm.__version__
    record["foreign"] = sorted(foreign)
    overrides = profile_overrides(folder, args.extra)
    record["student_method"] = next((o.split("=", 1)[1] for o in overrides if o.startswith("student.method=")), "noisy")
    record["extra"] = str(args.extra.relative_to(ROOT)) if args.extra.is_relative_to(ROOT) else str(args.extra)
    write_json(out_json, record)  # the pipeline's figures are kept even if the upper bound fails
    write_text(out_md, render(record))
    if foreign:
        print(out_md.read_text())
    elif not args.skip_upper:
        add_upper_bound(record, args.extra)


def run_pipeline(folder: Path, extra: Path, *, label: str) -> dict:
    """`dvc exp run --temp` of the photo profile + `extra` on `folder`: stamp, wall time, per-stage figures."""
    pipeline = f"{label}-{uuid.uuid4().hex[:6]}"
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    env = os.environ | {
        "SSTL_PIPELINE_ID": pipeline,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    sets = [a for o in profile_overrides(folder, extra) for a in ("-S", o)]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", pipeline, *sets], cwd=ROOT, env=env, check=True
    )
    record = {**stamp(), "pipeline_seconds": round(time.perf_counter() - start, 1), **collect(pipeline)}
    record["device"] = record["stages"].get("teacher", {}).get("device", "cpu")
    return record


def add_upper_bound(record: dict, extra: Path) -> None:
    all_folder = CACHE.parent / "clothing-all"
    layout(all_folder, 0, seed=0, all_labels=True)
    record["upper_bound"] = upper_bound(all_folder, extra)
    write_json(OUT_JSON, record)
    write_text(OUT_MD, render(record))
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
