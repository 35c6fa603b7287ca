"""Photo benchmark suite: the photo profile exactly as a user applies it, on several public real-photo sets.

    python benchmarks/photos.py                          # every set found on this machine, ~15 min each (2 cores)
    python benchmarks/photos.py --sets bloodcell8,weather4
    python benchmarks/photos.py --render                 # the markdown again from the JSON
    python benchmarks/photos.py --keep-upper-bound       # each set's upper bound from the JSON (it trains the
                                                         #   teacher's recipe only: unchanged by student changes)
    python benchmarks/photos.py --sets weather4 --seeds 42,1,2   # the table from seed 42, a line over all three
    python benchmarks/photos.py --out reports/benchmarks/photos-amd --skip-upper   # another machine's run,
                                                         #   beside the committed tables, not over them

Each set is a folder `train/<class>/` + `test/<class>/` (+ `validation/<class>/`, test-add) under
~/.cache/sstl-data/ (see SETS). benchmarks/photo-sets/<set>.md says where its photos come from, their
licence and how they were selected; <set>.files.csv lists every file with its sha256, checked before a run.
Per set: 20 seeded labelled photos per class from train/, the rest of train/ as the unlabelled pool
under neutral names, then `dvc exp run --temp` with the photo profile (`sstl profile photos`) and
precision bf16 where the CPU has it natively (fp32 elsewhere): no per-set override, the gain must live
in the defaults. Then the upper bound: the teacher's backbone and recipe, supervised on every train
label. One table per set (probes, teacher, student, fine-tuned, the model to use, upper bound, minutes,
peak memory) in reports/benchmarks/photos.{md,json}, with the machine, date, commit and lock. With
--seeds, the whole pipeline runs once per training seed (params `seed`: the teacher's val hold-out, the
probes' CV folds, every initialisation and augmentation draw; the labelled photos stay the same): the
table shows the first seed's run, a line under it the model to use and the best probe at every seed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import clothing  # noqa: E402

from sstl.core.files import write_json, write_text  # noqa: E402

DATA = Path.home() / ".cache" / "sstl-data"
OUT = ROOT / "reports/benchmarks/photos"  # .json and .md
PER_CLASS = 20


@dataclass(frozen=True)
class PhotoSet:
    """A public set of real photos, laid out as train/ + evaluation folders under DATA/<folder>."""

    folder: str
    about: str  # what the photos are, its licence: one line for the table's title
    splits: tuple[tuple[str, str], ...] = (("test", "test"),)  # the set's folder -> the sstl split
    foreign: tuple[str, ...] = ()  # classes whose photos all go to the pool, unlabelled and of no known class


SETS = {
    "clothing": PhotoSet(
        "clothing",
        "clothes, product and street photos, 10 imbalanced classes (A. Grigorev's subset, CC0 1.0); "
        "test-add: its validation/",
        clothing.CLOTHING_SPLITS,
    ),
    "clothing-ood": PhotoSet(
        "clothing",
        "the clothing set with every t-shirt and hat photo in the pool: 32% of it of no class the labels know",
        clothing.CLOTHING_SPLITS,
        foreign=("t-shirt", "hat"),
    ),
    "bloodcell8": PhotoSet(
        "bloodcell8",
        "blood cell microscopy, 8 classes, 375 per class (Acevedo et al. 2020, Data in Brief; CC BY 4.0)",
    ),
    "weather4": PhotoSet(
        "weather4",
        "outdoor weather scenes, 4 classes (Ajayi 2018, Multi-class Weather Dataset, Mendeley; CC BY 4.0)",
    ),
}


def precision() -> str:
    """bf16 where the CPU computes it natively (as docs/devices.md recommends), fp32 elsewhere."""
    from sstl.runtime.device import native_bf16

    return "bf16" if native_bf16() else "fp32"


def check_files(name: str, source: Path) -> None:
    """The set on disk is the one benchmarks/photo-sets/<set>.files.csv lists, file for file."""
    listing = ROOT / "benchmarks" / "photo-sets" / f"{name}.files.csv"
    if not listing.is_file():
        return
    with listing.open(newline="") as fh:
        want = {(r["split"], r["class"], r["file"]): r["sha256"] for r in csv.DictReader(fh)}
    have = {
        (f.parts[-3], f.parts[-2], f.name): hashlib.sha256(f.read_bytes()).hexdigest()
        for split in {k[0] for k in want}
        for f in sorted((source / split).glob("*/*"))
    }
    if have != want:
        differ = sorted(set(have.items()) ^ set(want.items()))[:3]
        raise SystemExit(f"error: {source} is not the {name} set of {listing.name} (first differences: {differ})")


def run_set(
    name: str, spec: PhotoSet, *, upper_bound: dict | None = None, seed: int | None = None, with_upper: bool = True
) -> dict:
    """Lay the set out, run the pipeline as a user would (at params' seed, or `seed`), train the upper bound
    (or keep `upper_bound`, as measured before, with the commit it was measured at; none: `with_upper`
    False): the set's record."""
    import timm
    import torch

    source = DATA / spec.folder
    if spec.folder == "clothing":
        clothing.unpack()
    if not (source / "train").is_dir():
        raise SystemExit(f"error: {source}/train not found: lay the {name} set out there (see its SOURCE.md)")
    check_files(spec.folder, source)
    folder = DATA / f"{name}-{PER_CLASS}"
    foreign = frozenset(spec.foreign)
    counts = clothing.layout(folder, PER_CLASS, seed=0, source=source, splits=spec.splits, foreign=foreign)
    mode = precision()
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / "extra.yaml"  # the one thing besides the folder that a user sets: the precision
        overrides: dict = {"precision": {"train": mode, "infer": mode}}
        if seed is not None:  # a benchmark's second opinion on the same photos, not a user's setting
            overrides["seed"] = seed
        extra.write_text(yaml.safe_dump(overrides))
        record = clothing.run_pipeline(folder, extra, label=name)
        record["upper_bound_commit"] = record["commit"]
        if upper_bound is not None:
            record["upper_bound"] = upper_bound
        elif with_upper and not foreign:
            all_folder = DATA / f"{name}-all"
            clothing.layout(all_folder, 0, seed=0, all_labels=True, source=source, splits=spec.splits)
            record["upper_bound"] = clothing.upper_bound(all_folder, extra)
    return {
        **record,
        "seed": seed if seed is not None else yaml.safe_load((ROOT / "params.yaml").read_text())["seed"],
        "about": spec.about,
        "counts": counts,
        "precision": mode,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def best_probe(models: dict, split: str = "test") -> float | None:
    """The highest of the frozen-feature baselines (probe, probe_student, probe.extra's probe_<arch>) on
    `split` (None where none has it)."""
    values = [v[split] for k, v in models.items() if k.startswith("probe") and v.get(split) is not None]
    return max(values, default=None)


def seed_line(runs: dict) -> str:
    """One line over the runs at several training seeds: the model to use against the best probe at each."""

    def figures(values: list[float]) -> str:
        return " / ".join(f"{v:.4f}" for v in values)

    seeds = list(runs)
    use = [runs[s]["models"][runs[s]["use"]]["test"] for s in seeds]
    best = [best_probe(runs[s]["models"]) for s in seeds]
    teacher = [runs[s]["models"].get("teacher", {}).get("test") for s in seeds]
    gains = [(u - b) * 100 for u, b in zip(use, best, strict=True)]
    line = (
        f"Training seeds {' / '.join(seeds)} (the same labelled photos): the model to use {figures(use)} on test, "
        f"the best probe {figures(best)}: {' / '.join(f'{g:+.1f}' for g in gains)} points "
        f"(mean {sum(gains) / len(gains):+.1f})"
    )
    if None not in teacher:
        line += f"; the teacher {figures(teacher)}"
    use_add = [runs[s]["models"][runs[s]["use"]].get("test_add") for s in seeds]
    best_add = [best_probe(runs[s]["models"], "test_add") for s in seeds]
    if None not in use_add and None not in best_add:
        line += f"; on test-add the model to use {figures(use_add)}, the best probe {figures(best_add)}"
    return line + "."


MODELS = {
    "probe": "baseline: frozen Lite0 + logistic regression (every label, C by 5-fold CV)",
    "probe_student": "baseline: frozen Lite2 + logistic regression (same labels and CV)",
    "teacher": "teacher (Lite0, fine-tuned on three quarters of the labels, its epochs chosen on the rest)",
    "student": "student (Lite2, consistency on the whole pool, every label)",
    "finetuned": "fine-tuned student (every label)",
}


def render(records: dict) -> str:
    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) and v == v else "—"  # NaN: a split the set does not have

    lines = [
        "# Photo benchmark suite: the photo profile on public real-photo sets",
        "",
        "`python benchmarks/photos.py`: per set, 20 labelled photos per class (a quarter held out as val to "
        "choose the teacher's epochs, then every label trains: `data.refit`), the rest of train/ unlabelled; "
        "the photo profile as `sstl profile photos` writes it, precision bf16 where "
        "native; no per-set override. Accuracy on each set's test/ (and test-add where it has one).",
    ]
    for name, r in records.items():
        c, m = r["counts"], r["models"]
        use = r.get("use")
        lines += [
            "",
            f"## {name}",
            "",
            f"{r['about']}. {c['labeled']} labelled, {c['unlabeled']} unlabelled"
            + (f" ({c['foreign_in_pool']} of no known class)" if c.get("foreign_in_pool") else "")
            + f", test {c['test']}"
            + (f", test-add {c['test-add']}" if c.get("test-add") else "")
            + ".",
            f"Machine: {r['machine']}; date {r['date']}; commit {r['commit']}; {r['environment']}; "
            f"timm {r['timm']}; precision {r['precision']}; device {r['device']}.",
            "",
            "| model | test acc | test-add acc |",
            "|---|---|---|",
        ]
        for k, label in clothing.rows(m, MODELS):
            mark = " **(model to use)**" if k == use else ""
            lines.append(f"| {label}{mark} | {f(m[k]['test'])} | {f(m[k]['test_add'])} |")
        ub = r.get("upper_bound")
        if ub:
            n = ub["n_train"] + ub["n_val"]
            at = r.get("upper_bound_commit", r["commit"])
            when = "" if at == r["commit"] else f" (measured at commit {at})"
            lines.append(
                f"| upper bound: {ub['arch']}, all {n} train labels{when} | {f(ub['test'])} | {f(ub['test_add'])} |"
            )
        if use in m:
            gains = []
            for split, shown in (("test", "test"), ("test_add", "test-add")):
                best = best_probe(m, split)
                if best is not None and best == best and m[use].get(split) is not None:
                    gains.append(f"{(m[use][split] - best) * 100:+.1f} points against the best probe on {shown}")
            if "teacher" in m:
                gains.append(f"{(m[use]['test'] - m['teacher']['test']) * 100:+.1f} against the teacher on test")
            lines += ["", f"The model to use ({use}): {'; '.join(gains)}."]
        if len(r.get("seeds", {})) > 1:
            lines.append(seed_line(r["seeds"]))
        peak = max(s["peak_rss_mb"] for s in r["stages"].values())
        lines.append(f"Whole pipeline: {r['pipeline_seconds'] / 60:.1f} min wall, peak RSS {peak} MB (stage by stage: "
                     f"the JSON twin).")  # fmt: skip
        if r.get("note"):  # how the run went, where it bears on its figures (written by hand into the JSON)
            lines.append(f"Note: {r['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="photo benchmark suite (real photos, the photo profile)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from the JSON")
    upper = ap.add_mutually_exclusive_group()
    upper.add_argument(
        "--keep-upper-bound", action="store_true", help="keep each set's all-labels upper bound from the JSON"
    )
    upper.add_argument("--skip-upper", action="store_true", help="no all-labels upper bound (neither trained nor kept)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the tables' path without suffix (default {OUT})")
    ap.add_argument(
        "--seeds", default="", help="comma-separated training seeds, each a whole run (default: params.yaml's seed)"
    )
    args = ap.parse_args()
    try:
        seeds: list[int | None] = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds!r}: whole numbers separated by commas, e.g. 42,1,2") from None
    out_json, out_md = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    records = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if not args.render:
        for name in (s for s in args.sets.split(",") if s):
            if name not in SETS:
                raise SystemExit(f"error: unknown set {name!r}: choose from {', '.join(SETS)}")
            before = records.get(name, {})
            kept = before.get("upper_bound") if args.keep_upper_bound else None
            runs: dict[str, dict] = {}
            for k, seed in enumerate(seeds):
                # the upper bound is the teacher's recipe on every label: measured once, at the first seed
                run = run_set(name, SETS[name], upper_bound=kept, seed=seed, with_upper=k == 0 and not args.skip_upper)
                runs[str(run["seed"])] = {key: run[key] for key in ("models", "use", "commit", "date")}
                if k == 0:
                    records[name] = run
                    if kept is not None:
                        records[name]["upper_bound_commit"] = before.get("upper_bound_commit", before["commit"])
                records[name]["seeds"] = runs
                write_json(out_json, records)  # each set's figures are kept even if a later set or seed fails
                write_text(out_md, render(records))
    write_text(out_md, render({k: records[k] for k in SETS if k in records}))
    print(out_md.read_text())


if __name__ == "__main__":
    main()
