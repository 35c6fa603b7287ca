"""Stage pseudolabel: the teacher scores the unlabelled pool; keep the confident (threshold) or top-K.

Writes the selected rows (pseudolabels.csv: hard labels) and, row for row, the teacher's distribution
softmax(logits / temperature) of each row's image (pseudoprobs.npy, float32 (rows, classes): soft labels).

The pool is streamed shard by shard and the running selection saved to STATE after each shard, so
a killed run resumes where it stopped. Several processes: `torchrun --standalone --nproc_per_node N
stages/pseudolabel.py` (rank 0 writes the outputs and logs to MLflow); see README.
"""

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)
import numpy as np

from sstl import tracking
from sstl.dataset import load_classes, load_images
from sstl.errors import stage_main
from sstl.files import atomic_path, write_csv, write_json
from sstl.models import load_checkpoint
from sstl.params import load_params
from sstl.pseudolabel import clear_state
from sstl.runtime import distributed
from sstl.workflow import pseudolabel

PREPARED = Path("data/prepared")
TEACHER = Path("models/teacher.pt")
OUT = Path("data/pseudolabels.csv")
PROBS = Path("data/pseudoprobs.npy")  # row i: the soft label of OUT's row i
COUNTS = Path("reports/pseudolabel/counts.csv")
METRICS = Path("reports/pseudolabel/summary.json")
STATE = Path(".sstl-state/pseudolabel")  # resume state: git-ignored, not a DVC output, removed on success


@stage_main
def main() -> None:
    p = load_params()
    runtime = p.runtime("infer")
    model, _ = load_checkpoint(TEACHER, runtime.device)
    classes = load_classes(PREPARED)
    with distributed(runtime) as (rank, _):
        run: AbstractContextManager[Any] = nullcontext()
        if rank == 0:  # one MLflow run, one writer
            run = tracking.stage_run(
                "pseudolabel",
                p.mlflow.experiment,
                {**runtime.describe(), "pseudolabel": p.pseudolabel.model_dump()},
            )
        with run:
            start = time.perf_counter()
            selected = pseudolabel(model, PREPARED, p.pseudolabel, classes, state_dir=STATE, runtime=runtime)
            seconds = time.perf_counter() - start
            if selected is None:  # a rank > 0: its shards are merged into rank 0's selection
                return
            rows, counts, probs = selected
            scores = [r["score"] for r in rows]
            n_pool = len(load_images(PREPARED, "unlabeled"))
            summary = {"n_pool": n_pool, "n_selected": len(rows), "mean_score": sum(scores) / max(len(scores), 1)}
            write_csv(OUT, rows, ("index", "path", "label", "label_index", "score"))
            with atomic_path(PROBS) as tmp, tmp.open("wb") as f:
                np.save(f, probs.numpy().astype(np.float32))
            write_csv(COUNTS, counts, ("class", "count"))
            write_json(METRICS, summary)
            tracking.log_metrics(summary | {"infer_images_per_second": n_pool / seconds})  # timing: MLflow only
            tracking.log_artifacts(COUNTS)
    clear_state(STATE)
    print(f"pseudolabel: {summary}")


if __name__ == "__main__":
    main()
