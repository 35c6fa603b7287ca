"""Stage evaluate: teacher, student and fine-tuned student on test and test-add."""

from pathlib import Path

from sstl import tracking
from sstl.dataset import load_classes, load_split
from sstl.errors import stage_main
from sstl.files import write_csv, write_json, write_text
from sstl.models import load_checkpoint
from sstl.params import load_params
from sstl.report import summary_markdown
from sstl.workflow import evaluate_model

PREPARED = Path("data/prepared")
MODELS = {name: Path(f"models/{name}.pt") for name in ("teacher", "student", "finetuned")}
SPLITS = ("test", "test-add")
METRICS, PER_CLASS = Path("reports/metrics.json"), Path("reports/per_class.json")
CONFUSION, SUMMARY = Path("reports/confusion"), Path("reports/summary.md")


@stage_main
def main() -> None:
    p = load_params()
    runtime = p.runtime("infer")
    classes = load_classes(PREPARED)
    data = {split: load_split(PREPARED, split) for split in SPLITS}
    metrics: dict = {}
    per_class: dict = {}
    with tracking.stage_run(
        "evaluate", p.mlflow.experiment, {**runtime.describe(), "evaluate": p.evaluate.model_dump()}
    ):
        for name, path in MODELS.items():
            model, _ = load_checkpoint(path, runtime.device)
            for split, d in data.items():
                r = evaluate_model(model, d, num_classes=len(classes), bins=p.evaluate.ece_bins, runtime=runtime)
                metrics.setdefault(name, {})[split] = {k: round(r[k], 4) for k in ("accuracy", "macro_f1", "ece")}
                per_class.setdefault(name, {})[split] = dict(zip(classes, r["per_class_accuracy"], strict=True))
                rows = [
                    {"actual": classes[t], "predicted": classes[q]}
                    for t, q in zip(d.labels.tolist(), r["predictions"], strict=True)
                ]
                write_csv(CONFUSION / f"{name}-{split}.csv", rows)
        write_json(METRICS, metrics)
        write_json(PER_CLASS, per_class)
        write_text(SUMMARY, summary_markdown(metrics))
        tracking.log_metrics(metrics)
        tracking.log_artifacts(METRICS, PER_CLASS, SUMMARY, CONFUSION)
    print(SUMMARY.read_text())


if __name__ == "__main__":
    main()
