"""CIFAR-10 benchmark: lay out the data, run the pipeline with the profile, collect the figures.

    python benchmarks/cifar10.py --labels-per-class 400     # 4,000 labels
    python benchmarks/cifar10.py --labels-per-class 25      # 250 labels

Runs `dvc exp run --temp` (the workspace is left as it is) with benchmarks/cifar10.yaml as -S
overrides, then reads each stage's MLflow run (wall time, peak memory, images per second) and the
evaluate metrics into reports/benchmarks/cifar10.json (one record per labels setting and model) and
reports/benchmarks/cifar10.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cifar10_folder import CACHE, SHARED, layout, unpack  # noqa: E402
from stamp import stamp  # noqa: E402

from sstl.core.files import write_json, write_text
from sstl.review.layout import model_order
from sstl.track.tracking import flatten

OUT_JSON = ROOT / "reports/benchmarks/cifar10.json"
OUT_MD = ROOT / "reports/benchmarks/cifar10.md"
STAGES = ("prepare", "pretrain", "tune", "teacher", "pseudolabel", "student", "finetune", "evaluate")
ROUND_STAGES = ("pseudolabel", "student")  # one of each per round: pseudolabel, student, pseudolabel@1, student@1, ...


def stage_order(stage: str) -> tuple[int, int, int]:
    """The pipeline's order, rounds included (MLflow names round r's stages `<stage>@r`, r >= 1)."""
    base, _, r = stage.partition("@")
    i = STAGES.index(base) if base in STAGES else len(STAGES)
    return (STAGES.index(ROUND_STAGES[0]), int(r or 0), i) if base in ROUND_STAGES else (i, 0, 0)


def round_students(profile: dict) -> list[str]:
    """The students of the profile's `rounds` (params.yaml's default: one round, `student`)."""
    return [r["student"] for r in profile.get("rounds", [{"student": "student"}])]


REPLACE = ("tune.space",)  # sections the profile replaces instead of merging into
# set as one value (their default is null, which has no keys to set)
WHOLE = ("data.test_add_corruptions", "teacher.augment")


def hydra(v: object) -> str:
    """A value in the Hydra override grammar that `dvc exp run -S` speaks."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(hydra(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(profile: Path, labels: int) -> dict:
    """The profile, then its per-labels adjustments (`<profile>-<labels>.yaml`, e.g. cifar10-250.yaml) over it."""
    raw = yaml.safe_load(profile.read_text())
    extra = profile.with_name(f"{profile.stem}-{labels}.yaml")
    return merged(raw, yaml.safe_load(extra.read_text())) if extra.is_file() else raw


def overrides(raw: dict, folder: Path) -> list[str]:
    """The profile as -S overrides: leaves are set; REPLACE sections are deleted (~) and added whole (+)."""
    out: list[str] = []
    for key in REPLACE:
        section, name = key.split(".")
        if name in raw.get(section, {}):
            out += [f"~{key}", f"+{key}={hydra(raw[section].pop(name))}"]
    for key in WHOLE:
        section, name = key.split(".")
        if name in raw.get(section, {}):
            out.append(f"{key}={hydra(raw[section].pop(name))}")
    out += [f"{k}={hydra(v)}" for k, v in flatten(raw).items()]
    return out + [f"data.folder={folder}"]


def collect(pipeline: str, labels: int, wall: float, students: list[str]) -> list[dict]:
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["sstl"], filter_string=f"tags.`sstl.pipeline` = '{pipeline}'", output_format="list"
    )
    by_stage = {r.data.tags.get("sstl.stage"): r.data.metrics for r in runs if r.data.tags.get("sstl.kind") == "stage"}
    stages = {
        s: {"seconds": round(m.get("stage_seconds", float("nan")), 1), "peak_rss_mb": round(m.get("peak_rss_mb", 0))}
        for s, m in by_stage.items()
    }
    ev = by_stage.get("evaluate", {})
    base = {
        "labels": labels,
        **stamp(),
        "pipeline_seconds": round(wall, 1),
        "stages": stages,
        "pseudolabel_images_per_second": by_stage.get("pseudolabel", {}).get("infer_images_per_second"),
    }
    rounds = [(name, "student" if r == 0 else f"student@{r}") for r, name in enumerate(students)]
    records = []
    for model, stage in (("teacher", "teacher"), *rounds, ("finetuned", "finetune")):
        records.append(
            base
            | {
                "model": model,
                "test_accuracy": ev.get(f"{model}.test.accuracy"),
                "test_add_accuracy": ev.get(f"{model}.test-add.accuracy"),
                "train_images_per_second": by_stage.get(stage, {}).get("train_images_per_second"),
            }
        )
    return records


def _pseudo_speed(m: dict) -> float | None:
    if "infer_images_per_second" in m:
        return round(m["infer_images_per_second"], 1)
    if "n_pool" in m and m.get("stage_seconds"):  # older runs: the whole stage, model loading included
        return round(m["n_pool"] / m["stage_seconds"], 1)
    return None


def render(records: list[dict]) -> str:
    lines = [
        "# CIFAR-10 benchmark",
        "",
        "Produced by `python benchmarks/cifar10.py --labels-per-class N` with `benchmarks/cifar10.yaml`.",
        "",
        "| labels | model | test acc | test-add acc | train img/s | pipeline min | machine | date | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:

        def f(v: object, spec: str = ".4f") -> str:
            return format(v, spec) if isinstance(v, (int, float)) else "—"

        lines.append(
            f"| {r['labels']} | {r['model']} | {f(r['test_accuracy'])} | {f(r['test_add_accuracy'])} | "
            f"{f(r['train_images_per_second'], '.0f')} | {f(r['pipeline_seconds'] / 60, '.1f')} | "
            f"{r['machine']} | {r['date']} | {r['commit']} |"
        )
    lines += ["", "Per stage (seconds / peak RSS MB) and the locked environment of each run:", ""]
    for labels in sorted({r["labels"] for r in records}):
        run = next(r for r in records if r["labels"] == labels)
        st = run["stages"]
        lines.append(
            f"- {labels} labels: "
            + ", ".join(f"{s} {st[s]['seconds']} s / {st[s]['peak_rss_mb']} MB" for s in sorted(st, key=stage_order))
            + f"; {run.get('environment', 'environment not recorded')}"
        )
    notes = ROOT / "benchmarks/cifar10-tried.md"  # the log of what was tried, kept by hand
    return "\n".join(lines) + "\n" + ("\n" + notes.read_text() if notes.is_file() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description="CIFAR-10 benchmark")
    ap.add_argument("--labels-per-class", type=int, default=400)
    ap.add_argument("--profile", type=Path, default=ROOT / "benchmarks/cifar10.yaml")
    ap.add_argument("--collect", metavar="PIPELINE_ID", help="only collect the figures of a finished run")
    ap.add_argument("--wall", type=float, default=float("nan"), help="with --collect: its wall seconds")
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the JSON table")
    args = ap.parse_args()
    n = args.labels_per_class
    if args.render:
        write_text(OUT_MD, render(json.loads(OUT_JSON.read_text())))
        return
    profile = load_profile(args.profile, n * 10)
    if args.collect:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
        save(collect(args.collect, n * 10, args.wall, round_students(profile)), n * 10)
        return
    unpack(SHARED, CACHE)
    folder = CACHE.parent / f"cifar10-{n}"
    print(layout(CACHE, folder, n, seed=0))

    pipeline = f"cifar10-{n * 10}-{uuid.uuid4().hex[:6]}"
    env = os.environ | {
        "SSTL_PIPELINE_ID": pipeline,
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    students = round_students(profile)
    sets = [a for o in overrides(profile, folder) for a in ("-S", o)]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", f"cifar10-{n * 10}", *sets],
        cwd=ROOT,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - start

    save(collect(pipeline, n * 10, wall, students), n * 10)


def save(new: list[dict], labels: int) -> None:
    """Replace this labels setting's records in the JSON table, re-render the markdown."""
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else []
    records = [r for r in old if r["labels"] != labels] + new
    records.sort(key=lambda r: (-r["labels"], model_order(r["model"])))  # teacher, each round's student, fine-tuned
    write_json(OUT_JSON, records)
    write_text(OUT_MD, render(records))
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
