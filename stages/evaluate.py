"""Stage evaluate: teacher, student and fine-tuned student on test and test-add, and on val for the
health checks (collapse, a model below its predecessor) and the choice of the model to use.

`evaluate.tta` averages each model's logits over flipped (and shifted) views (sstl.inference)."""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import health, tracking
from sstl.dataset import load_classes, load_split
from sstl.errors import stage_main
from sstl.files import write_csv, write_json, write_text
from sstl.models import load_checkpoint
from sstl.params import load_params
from sstl.report import summary_markdown
from sstl.workflow import evaluate_model

PREPARED = Path("data/prepared")
MODELS = {name: Path(f"models/{name}.pt") for name in ("teacher", "student", "finetuned")}
SPLITS = ("val", "test", "test-add")  # val: checks and choice only, never in the metrics
METRICS, PER_CLASS, HEALTH = Path("reports/metrics.json"), Path("reports/per_class.json"), Path("reports/health.json")
CONFUSION, SUMMARY = Path("reports/confusion"), Path("reports/summary.md")


@stage_main
def main() -> None:
    p = load_params()
    runtime = p.runtime("infer")
    classes = load_classes(PREPARED)
    data = {split: load_split(PREPARED, split) for split in SPLITS}
    absent = [s for s, d in data.items() if len(d) == 0 and s != "val"]  # e.g. a folder without test-add/
    metrics, per_class, val_acc, collapses = {}, {}, {}, {}
    with tracking.stage_run(
        "evaluate", p.mlflow.experiment, {**runtime.describe(), "evaluate": p.evaluate.model_dump()}
    ):
        for name, path in MODELS.items():
            model, _ = load_checkpoint(path, runtime.device)
            for split, d in data.items():
                if len(d) == 0:
                    continue
                r = evaluate_model(
                    model, d, num_classes=len(classes), bins=p.evaluate.ece_bins, runtime=runtime, tta=p.evaluate.tta
                )
                if split == "val":
                    val_acc[name] = round(r["accuracy"], 4)
                    collapses[name] = health.collapse(r["predictions"], d.labels, classes)
                    continue
                metrics.setdefault(name, {})[split] = {k: round(r[k], 4) for k in ("accuracy", "macro_f1", "ece")}
                per_class.setdefault(name, {})[split] = dict(zip(classes, r["per_class_accuracy"], strict=True))
                rows = [
                    {"actual": classes[t], "predicted": classes[q]}
                    for t, q in zip(d.labels.tolist(), r["predictions"], strict=True)
                ]
                write_csv(CONFUSION / f"{name}-{split}.csv", rows)
        warnings = health.check_models(val_acc, collapses)
        verdict = {
            "val_accuracy": val_acc,
            "use": health.recommend(val_acc),
            "warnings": warnings,
            "absent_splits": absent,
        }
        write_json(METRICS, metrics)
        write_json(PER_CLASS, per_class)
        write_json(HEALTH, verdict)
        write_text(SUMMARY, summary_markdown(metrics, verdict))
        tracking.log_metrics(metrics | {"val_accuracy": val_acc})
        tracking.set_tags({"sstl.use": verdict["use"], "sstl.warnings": "; ".join(warnings) or "none"})
        tracking.log_artifacts(METRICS, PER_CLASS, HEALTH, SUMMARY, CONFUSION)
    health.warn("evaluate", warnings)
    print(SUMMARY.read_text())


if __name__ == "__main__":
    main()
