"""reports/model_card.md: one page for a reviewer who will not open the JSON reports: what the models were
trained on, the params that define them, how they score (with calibration), where the model in use fails,
the health verdict and the environment.

`model_card` is pure (plain dicts in, markdown out, no file reading, no clock), so the same inputs give
the same bytes and a re-run of `evaluate` leaves the card unchanged. `gather_data` and `gather_params`
collect what evaluate does not already hold: the prepared folder's counts and skips, and the params each
checkpoint was really trained with (the teacher's tuned keys included).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sstl.core.files import read_csv, read_json
from sstl.data.dataset import SPLITS as DATA_SPLITS
from sstl.eval.report import baseline_line

EVAL_SPLITS = ("test", "test-add")
MODELS = ("teacher", "student", "finetuned")  # one round; later rounds' students come between (params `rounds`)
SECTIONS = {"teacher": "teacher", "finetuned": "finetune"}  # params.yaml section per model; every student: student
TOP = 5  # rows in the worst-class and confused-pair tables
SKIPPED_LISTED = 10  # skipped entries listed one by one; all are in skipped.csv
DASH = "—"


def worst_classes(
    per_class: Mapping[str, float], *, support: Mapping[str, int] | None = None, top: int = TOP
) -> list[tuple[str, float]]:
    """The `top` classes with the lowest accuracy (ties: by name). With `support` (images per true class),
    classes without images are left out: their accuracy 0.0 would be an artefact, not a failure."""
    present = {c: a for c, a in per_class.items() if support is None or support.get(c, 0) > 0}
    return sorted(present.items(), key=lambda item: (item[1], item[0]))[:top]


def confused_pairs(rows: Iterable[Mapping[str, str]], top: int = TOP) -> list[dict[str, Any]]:
    """The `top` most frequent (true, predicted) mistakes from confusion rows ({actual, predicted}), each with
    its count and share of the true class's images; directed (a->b apart from b->a), ties by name."""
    rows = list(rows)
    support = Counter(r["actual"] for r in rows)
    mistakes = Counter((r["actual"], r["predicted"]) for r in rows if r["actual"] != r["predicted"])
    ranked = sorted(mistakes.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [{"actual": a, "predicted": p, "count": n, "share": n / support[a]} for (a, p), n in ranked]


def class_support(rows: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """Images per true class in confusion rows."""
    return dict(Counter(r["actual"] for r in rows))


def gather_data(
    prepared: Path | str, *, folder: str, test_add_corruptions: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The data section from what `prepare` wrote: each split's count and source (splits.json), the number
    of classes, every skipped entry with its reason (skipped.csv), the near-duplicates dropped (neardup.csv),
    and whether test-add is a folder, generated corruptions of test (`data.test_add_corruptions`) or absent."""
    prepared = Path(prepared)
    splits = read_json(prepared / "splits.json")
    n_test_add = int(splits.get("test-add", {}).get("images", 0))
    corruptions = dict(test_add_corruptions) if test_add_corruptions is not None and n_test_add else None
    kind = "absent" if n_test_add == 0 else ("corruptions" if corruptions is not None else "folder")
    neardup = prepared / "neardup.csv"
    return {
        "folder": folder,
        "classes": len(read_json(prepared / "classes.json")),
        "splits": {s: {"images": int(v["images"]), "source": str(v["source"])} for s, v in splits.items()},
        "test_add": {"kind": kind, "corruptions": corruptions},
        "skipped": [{"path": r["path"], "reason": r["reason"]} for r in read_csv(prepared / "skipped.csv")],
        "near_duplicates": len(read_csv(neardup)) if neardup.is_file() else 0,
    }


def gather_params(checkpoints: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """The params that define the models: per model, from its checkpoint's recorded config (what it was
    really trained with: the teacher's tuned keys, not params.yaml's defaults), params.yaml's section where a
    checkpoint records none; plus pseudo-label selection, evaluation TTA, precision and seed (`params` is
    `Params.model_dump()`; checkpoints are `load_checkpoint`'s payloads, the state dict is not read)."""
    select = params["pseudolabel"]
    keys = ("method", "top_k", "top_p") if select["method"] == "topk" else ("method", "threshold")
    return {
        "seed": params["seed"],
        "precision": dict(params["precision"]),
        "models": {m: _model_params(m, payload, params) for m, payload in checkpoints.items()},  # pipeline order
        "pseudolabel": {
            **{k: select[k] for k in (*keys, "tta", "temperature")},
            "student targets": params["student"]["pseudo_targets"],
        },
        "evaluate": {"tta": params["evaluate"]["tta"], "ece_bins": params["evaluate"]["ece_bins"]},
    }


def _model_params(name: str, payload: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the params table; fine-tuning has one learning rate and no head-only phase."""
    config = payload.get("config", {})
    section = SECTIONS.get(name, "student")
    train = config.get(section) or params[section]
    model = payload.get("model", {})
    finetuned = name == "finetuned"
    return {
        "arch": model.get("arch", train.get("arch")),
        "weights": config.get("from", DASH) if finetuned else train.get("weights"),
        "head_epochs": 0 if finetuned else train.get("head_epochs"),
        "epochs": train.get("epochs"),
        "epochs_run": payload.get("fit", {}).get("epochs_run"),
        "lr": train.get("lr"),
        "finetune_lr": train.get("lr") if finetuned else train.get("finetune_lr"),
        "batch_size": train.get("batch_size"),
        "precision": config.get("precision", params["precision"]["train"]),
    }


def _fmt(value: Any, digits: str = ".4f") -> str:
    """A table cell: floats to 4 decimals (params: 4 significant digits), None as a dash, `|` escaped."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, digits)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[int] = (), digits: str = ".4f"
) -> list[str]:
    """A markdown table; columns in `right` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
    return lines


def _absent(split: str, data: Mapping[str, Any]) -> str:
    """Why a split has no figures, as prepare recorded it."""
    source = str(data.get("splits", {}).get(split, {}).get("source", "no images"))
    return f"- {split}: {source}" if source.startswith("absent") else f"- {split}: absent ({source})"


def _skip_kind(reason: str) -> str:
    """A skip reason without its particulars (which image it duplicates, the decoder's message)."""
    if reason.startswith("duplicate of evaluation image"):
        return "duplicate of an evaluation image"
    return reason.split(" (")[0]


def _data_section(data: Mapping[str, Any]) -> list[str]:
    splits = data.get("splits", {})
    lines = ["## Data", "", f"Folder `{data.get('folder', DASH)}`, {data.get('classes', DASH)} classes.", ""]
    order = [s for s in DATA_SPLITS if s in splits] + sorted(set(splits) - set(DATA_SPLITS))
    lines += _table(
        ("split", "images", "source"), ((s, splits[s]["images"], splits[s]["source"]) for s in order), right=(1,)
    )
    lines += ["", _test_add_line(data.get("test_add", {}), data.get("folder", DASH))]
    if data.get("near_duplicates"):
        lines.append(
            f"Unlabelled near-duplicates of evaluation images dropped: {data['near_duplicates']} (neardup.csv)."
        )
    return lines + ["", *_skipped_lines(data.get("skipped", []))]


def _test_add_line(test_add: Mapping[str, Any], folder: str) -> str:
    kind = test_add.get("kind", "absent")
    if kind == "folder":
        return f"test-add: a folder of its own, `{folder}/test-add/`."
    if kind == "corruptions":
        c = test_add.get("corruptions") or {}
        kinds = ", ".join(c.get("kinds", [])) or DASH
        return (
            f"test-add: generated from test/ under seeded corruptions ({kinds}; "
            f"severity {c.get('severity', DASH)}, seed {c.get('seed', DASH)})."
        )
    return "test-add: absent (no test-add/ folder and no data.test_add_corruptions): no shift is measured."


def _skipped_lines(skipped: Sequence[Mapping[str, str]]) -> list[str]:
    if not skipped:
        return ["Skipped entries: none."]
    kinds = Counter(_skip_kind(r["reason"]) for r in skipped)
    lines = [f"Skipped entries: {len(skipped)} (all in `data/prepared/skipped.csv`).", ""]
    lines += _table(("reason", "entries"), sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])), right=(1,))
    lines += ["", *_table(("path", "reason"), ((r["path"], r["reason"]) for r in skipped[:SKIPPED_LISTED]))]
    if len(skipped) > SKIPPED_LISTED:
        lines.append(f"\n... and {len(skipped) - SKIPPED_LISTED} more.")
    return lines


def _params_section(params: Mapping[str, Any]) -> list[str]:
    precision = params.get("precision", {})
    lines = [
        "## Params",
        "",
        f"Seed {params.get('seed', DASH)}; precision: training {precision.get('train', DASH)}, "
        f"inference {precision.get('infer', DASH)}. Epochs are maxima (early stopping); lr trains the head "
        "(phase 1), finetune lr the unfrozen blocks (phase 2); epochs run counts both phases.",
        "",
    ]
    head = (
        "model",
        "arch",
        "weights",
        "head epochs",
        "epochs",
        "epochs run",
        "lr",
        "finetune lr",
        "batch",
        "precision",
    )
    keys = ("arch", "weights", "head_epochs", "epochs", "epochs_run", "lr", "finetune_lr", "batch_size", "precision")
    rows = ((m, *(p.get(k) for k in keys)) for m, p in params.get("models", {}).items())
    lines += _table(head, rows, right=(3, 4, 5, 6, 7, 8), digits=".4g")
    for title, key in (("Pseudo-label selection", "pseudolabel"), ("Evaluation", "evaluate")):
        lines += ["", f"{title}:", "", *_table(("key", "value"), params.get(key, {}).items(), digits=".4g")]
    return lines


def _metrics_section(metrics: Mapping[str, Any], data: Mapping[str, Any], use: str) -> list[str]:
    lines = ["## Metrics", "", f"ECE: expected calibration error. The model in use ({use}) is marked *.", ""]
    rows = []
    for model, per_split in metrics.items():
        for split in EVAL_SPLITS:
            if split in per_split:
                m = per_split[split]
                rows.append((model + (" *" if model == use else ""), split, m["accuracy"], m["macro_f1"], m["ece"]))
    lines += _table(("model", "split", "accuracy", "macro-F1", "ECE"), rows, right=(2, 3, 4))
    present = {s for per_split in metrics.values() for s in per_split}
    missing = [_absent(s, data) for s in EVAL_SPLITS if s not in present]
    return lines + (["", *missing] if missing else [])


def _reliability_section(reliability: Mapping[str, Any], data: Mapping[str, Any], use: str) -> list[str]:
    lines = ["## Calibration", ""]
    for split in EVAL_SPLITS:
        bins = reliability.get(use, {}).get(split)
        if not bins:
            lines += [_absent(split, data), ""]
            continue
        total = sum(b["count"] for b in bins)
        filled = [b for b in bins if b["count"]]
        ece = sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in filled)
        rows = [
            (_bin(b, last=b is bins[-1]), b["count"], b["confidence"], b["accuracy"], b["accuracy"] - b["confidence"])
            for b in filled
        ]
        lines += [f"Reliability of {use} on {split} ({total} images, {len(bins)} equal-width confidence bins):", ""]
        lines += _table(
            ("confidence", "images", "mean confidence", "accuracy", "accuracy − confidence"), rows, right=(1, 2, 3, 4)
        )
        empty = len(bins) - len(filled)
        lines += ["", f"ECE from these bins: {ece:.4f}" + (f" ({empty} empty bins not shown)." if empty else "."), ""]
    return lines[:-1]


def _bin(b: Mapping[str, Any], *, last: bool) -> str:
    """[lower, upper) as expected_calibration_error bins; the last holds 1.0."""
    return f"[{b['lower']:.4f}, {b['upper']:.4f}{']' if last else ')'}"


def _errors_section(
    per_class: Mapping[str, Any], confusion: Mapping[str, Any], data: Mapping[str, Any], use: str
) -> list[str]:
    lines = [f"## Where {use} fails", "", "Lowest per-class accuracy:", ""]
    worst_rows, pair_rows, missing = [], [], []
    for split in EVAL_SPLITS:
        accuracy = per_class.get(use, {}).get(split)
        rows = confusion.get(use, {}).get(split)
        if accuracy is None:
            missing.append(_absent(split, data))
            continue
        support = class_support(rows) if rows is not None else None
        worst_rows += [
            (split, c, a, DASH if support is None else support.get(c, 0))
            for c, a in worst_classes(accuracy, support=support)
        ]
        pair_rows += [(split, p["actual"], p["predicted"], p["count"], p["share"]) for p in confused_pairs(rows or [])]
    lines += _table(("split", "class", "accuracy", "images"), worst_rows, right=(2, 3))
    lines += ["", "Most confused pairs (true → predicted; share of the true class's images):", ""]
    lines += _table(("split", "true", "predicted", "images", "share"), pair_rows, right=(3, 4))
    return lines + (["", *missing] if missing else [])


def _health_section(verdict: Mapping[str, Any]) -> list[str]:
    val = verdict.get("val_accuracy", {})
    lines = [
        "## Health",
        "",
        f"Model to use: **{verdict.get('use', DASH)}** (the latest model no other beats on val beyond chance; "
        "test never chooses).",
        "",
        *_table(("model", "val accuracy"), val.items(), right=(1,)),
        "",
    ]
    lines += [f"- baseline: {baseline_line(n, b)}" for n, b in verdict.get("baseline", {}).items()]
    lines += [""] if verdict.get("baseline") else []
    warnings = verdict.get("warnings", [])
    lines += [f"- **WARNING**: {w}" for w in warnings] or ["Warnings: none."]
    lines += [f"- left out: {s} (no images in this split)" for s in verdict.get("absent_splits", [])]
    return lines


def _environment_section(environment: Mapping[str, str]) -> list[str]:
    return ["## Environment", "", *_table(("key", "value"), environment.items())]


def _headline(per_split: Mapping[str, Any]) -> str:
    """The used model's accuracy per evaluated split, for the card's first line."""
    found = [f"{s} accuracy {per_split[s]['accuracy']:.4f}" for s in EVAL_SPLITS if s in per_split]
    return f" ({', '.join(found)})" if found else ""


def model_card(
    *,
    metrics: Mapping[str, Any],
    per_class: Mapping[str, Any],
    confusion: Mapping[str, Any],
    reliability: Mapping[str, Any],
    verdict: Mapping[str, Any],
    data: Mapping[str, Any],
    params: Mapping[str, Any],
    environment: Mapping[str, str],
) -> str:
    """The card as markdown. `metrics`, `per_class`: as reports/metrics.json and per_class.json
    ({model: {split: ...}}); `confusion`: {model: {split: [{actual, predicted}, ...]}}; `reliability`:
    {model: {split: reliability_bins(...)}}; `verdict`: reports/health.json; `data`: gather_data();
    `params`: gather_params(); `environment`: sstl.core.environment.describe() (plus a commit if wanted).
    Only the model in use (verdict["use"]) gets the calibration and error tables."""
    use = str(verdict.get("use", MODELS[-1]))
    sections = [
        [
            "# Model card",
            "",
            f"Model to use: **{use}**{_headline(metrics.get(use, {}))}. Written by the `evaluate` stage from the "
            "reports beside it (metrics.json, per_class.json, confusion/, health.json) and data/prepared/.",
        ],
        _data_section(data),
        _params_section(params),
        _metrics_section(metrics, data, use),
        _reliability_section(reliability, data, use),
        _errors_section(per_class, confusion, data, use),
        _health_section(verdict),
        _environment_section(environment),
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
