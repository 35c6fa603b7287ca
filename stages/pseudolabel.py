"""Stage pseudolabel@<round>: a round's teacher scores the unlabelled pool; keep the confident
(threshold) or top-K. `python stages/pseudolabel.py [TEACHER]`: models/<TEACHER>.pt, a teacher of
params.yaml's `rounds` (default: teacher, the first round's).

Writes the selected rows (data/pseudolabels/<TEACHER>.csv: hard labels) and, row for row, the
teacher's distribution softmax(logits / temperature) of each row's image (<TEACHER>.npy, float32
(rows, classes): soft labels).

The pool is streamed shard by shard and the running selection saved after each shard, so a killed
run resumes where it stopped. Several processes: `torchrun --standalone --nproc_per_node N
stages/pseudolabel.py` (rank 0 writes the outputs and logs to MLflow); see README.
"""

import sys
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
from sstl.pseudolabel import clear_state, pseudo_files
from sstl.runtime import distributed
from sstl.workflow import pseudolabel

PREPARED = Path("data/prepared")


@stage_main
def main() -> None:
    p = load_params()
    i, rnd = p.round_of(teacher=sys.argv[1] if len(sys.argv) > 1 else "teacher")
    out = pseudo_files(rnd.teacher)
    runtime = p.runtime("infer")
    model, _ = load_checkpoint(Path(f"models/{rnd.teacher}.pt"), runtime.device)
    classes = load_classes(PREPARED)
    with distributed(runtime) as (rank, _):
        run: AbstractContextManager[Any] = nullcontext()
        if rank == 0:  # one MLflow run, one writer
            run = tracking.stage_run(
                "pseudolabel" if i == 0 else f"pseudolabel@{i}",
                p.mlflow.experiment,
                {**runtime.describe(), "teacher": rnd.teacher, "pseudolabel": p.pseudolabel.model_dump()},
            )
        with run:
            start = time.perf_counter()
            selected = pseudolabel(model, PREPARED, p.pseudolabel, classes, state_dir=out.state, runtime=runtime)
            seconds = time.perf_counter() - start
            if selected is None:  # a rank > 0: its shards are merged into rank 0's selection
                return
            rows, counts, probs = selected
            scores = [r["score"] for r in rows]
            n_pool = len(load_images(PREPARED, "unlabeled"))
            summary = {"n_pool": n_pool, "n_selected": len(rows), "mean_score": sum(scores) / max(len(scores), 1)}
            write_csv(out.labels, rows, ("index", "path", "label", "label_index", "score"))
            with atomic_path(out.probs) as tmp, tmp.open("wb") as f:
                np.save(f, probs.numpy().astype(np.float32))
            write_csv(out.counts, counts, ("class", "count"))
            write_json(out.summary, summary)
            tracking.log_metrics(summary | {"infer_images_per_second": n_pool / seconds})  # timing: MLflow only
            tracking.log_artifacts(out.counts)
    clear_state(out.state)
    print(f"pseudolabel ({rnd.teacher}): {summary}")


if __name__ == "__main__":
    main()
