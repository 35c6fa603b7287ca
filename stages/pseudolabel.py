"""Stage pseudolabel@<round>: a round's teacher scores the unlabelled pool; keep the confident
(threshold) or top-K.

    python stages/pseudolabel.py --data data/prepared --model models/<TEACHER>.pt --probes models/probes
        --labels data/pseudolabels/<TEACHER>.csv --probs data/pseudolabels/<TEACHER>.npy
        --counts reports/pseudolabel/<TEACHER>/counts.csv --summary reports/pseudolabel/<TEACHER>/summary.json

<TEACHER> is a teacher of params.yaml's `rounds`. Writes the selected rows (`--labels`: hard labels)
and, row for row, the teacher's distribution softmax(logits / temperature) of each row's image
(`--probs`, float32 (rows, classes): soft labels). With `pseudolabel.with_probe` the teacher is the
ensemble of itself and the frozen-feature probe of its backbone (from `--probes`, the probe stage's),
and the probes of `probe.extra`'s backbones.

The pool is streamed shard by shard and the running selection saved after each shard, so a killed
run resumes where it stopped. Several processes: `torchrun --standalone --nproc_per_node N
stages/pseudolabel.py ...` (rank 0 writes the outputs and logs to MLflow); see docs/devices.md.
"""

import argparse
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)
import numpy as np

from sstl.core.files import atomic_path, write_csv, write_json
from sstl.data.dataset import load_classes, load_images
from sstl.models.checkpoint import load_checkpoint
from sstl.models.classifier import Ensemble
from sstl.params import load_params
from sstl.pipeline.pseudolabel import probes_of, pseudolabel
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.pseudo.pool import clear_state
from sstl.runtime.distributed import distributed
from sstl.track import tracking


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths(parser, inputs=["data", "model", "probes"], outputs=["labels", "probs", "counts", "summary", "ood"])
    out = parse_paths(parser)
    p = load_params()
    i, rnd = p.round_of(teacher=out.model.stem)  # models/<name>.pt
    state = Path(f".sstl-state/pseudolabel/{rnd.teacher}")  # the streaming selection's resume state: git-ignored
    runtime = p.runtime("infer")
    model, meta = load_checkpoint(out.model, runtime.device)
    scored_by = [rnd.teacher]
    if p.pseudolabel.with_probe:
        members = probes_of(meta, out.probes, runtime.device, extra=p.probe.extra)
        model, scored_by = Ensemble([model, *(m for _, m in members)]), [rnd.teacher, *(n for n, _ in members)]
    classes = load_classes(out.data)
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
            selected = pseudolabel(model, out.data, p.pseudolabel, classes, state_dir=state, runtime=runtime)
            seconds = time.perf_counter() - start
            if selected is None:  # a rank > 0: its shards are merged into rank 0's selection
                return
            rows, counts, probs, dropped = selected
            scores = [r["score"] for r in rows]
            n_pool = len(load_images(out.data, "unlabeled"))
            summary = {
                "scored_by": scored_by,  # the teacher, or the teacher and its backbone's probe (mean distribution)
                "n_pool": n_pool,
                "n_selected": len(rows),
                "mean_score": sum(scores) / max(len(scores), 1),
                "n_ood_dropped": len(dropped),
            }
            write_csv(out.labels, rows, ("index", "path", "label", "label_index", "score"))
            with atomic_path(out.probs) as tmp, tmp.open("wb") as f:
                np.save(f, probs.numpy().astype(np.float32))
            write_csv(out.counts, counts, ("class", "count"))
            write_csv(out.ood, dropped, ("index", "path", "predicted", "similarity", "threshold"))
            write_json(out.summary, summary)
            tracking.log_metrics(summary | {"infer_images_per_second": n_pool / seconds})  # timing: MLflow only
            tracking.log_artifacts(out.counts, out.ood)
    clear_state(state)
    print(f"pseudolabel ({rnd.teacher}): {summary}")


if __name__ == "__main__":
    main()
