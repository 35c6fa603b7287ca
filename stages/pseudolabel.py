"""Stage pseudolabel: the teacher scores the unlabelled pool; keep the confident (threshold) or top-K."""

from pathlib import Path

from sstl import tracking
from sstl.dataset import load_classes, load_split
from sstl.errors import stage_main
from sstl.files import write_csv, write_json
from sstl.models import load_checkpoint
from sstl.params import load_params
from sstl.workflow import pseudolabel

PREPARED = Path("data/prepared")
TEACHER = Path("models/teacher.pt")
OUT = Path("data/pseudolabels.csv")
COUNTS = Path("reports/pseudolabel/counts.csv")
METRICS = Path("reports/pseudolabel/summary.json")


@stage_main
def main() -> None:
    p = load_params()
    model, _ = load_checkpoint(TEACHER)
    pool, classes = load_split(PREPARED, "unlabeled"), load_classes(PREPARED)
    with tracking.stage_run("pseudolabel", p.mlflow.experiment, {"pseudolabel": p.pseudolabel.model_dump()}):
        rows, counts = pseudolabel(model, pool, p.pseudolabel, classes)
        scores = [r["score"] for r in rows]
        summary = {"n_pool": len(pool), "n_selected": len(rows), "mean_score": sum(scores) / max(len(scores), 1)}
        write_csv(OUT, rows, ("index", "path", "label", "label_index", "score"))
        write_csv(COUNTS, counts, ("class", "count"))
        write_json(METRICS, summary)
        tracking.log_metrics(summary)
        tracking.log_artifacts(COUNTS)
    print(f"pseudolabel: {summary}")


if __name__ == "__main__":
    main()
