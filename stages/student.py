"""Stage student@<round>: a larger network on labelled + pseudo-labelled images under strong augmentation.
`python stages/student.py [STUDENT]`: the round of params.yaml's `rounds` that trains models/<STUDENT>.pt
(default: student, the first round's) from its teacher's pseudo-labels.

Under torchrun every process trains on its share of each batch (DDP); rank 0 writes and logs.
"""

import sys
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)
import numpy as np
import torch
from torch.nn.functional import one_hot

from sstl import tracking
from sstl.dataset import ImageSet, load_classes, load_packing, load_split
from sstl.errors import stage_main
from sstl.files import read_csv
from sstl.params import load_params
from sstl.pretrain import resolve_weights
from sstl.pseudolabel import pseudo_files
from sstl.runtime import distributed
from sstl.transforms import augmenter
from sstl.workflow import Job, build_model, pseudo_targets, train_and_save

PREPARED = Path("data/prepared")
PRETRAIN = Path("models/pretrain.pt")
FEATURES = Path(".sstl-state/features")


@stage_main
def main() -> None:
    p = load_params()
    i, rnd = p.round_of(student=sys.argv[1] if len(sys.argv) > 1 else "student")
    given = pseudo_files(rnd.teacher)  # soft targets: the teacher's distribution per pseudo-label row
    model_path, curve = Path(f"models/{rnd.student}.pt"), Path(f"reports/curves/{rnd.student}.csv")
    runtime = p.runtime("train")
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    pool = load_split(PREPARED, "unlabeled", lazy=True)  # only the pseudo-labelled rows are read
    pseudo, soft = pseudo_targets(pool, read_csv(given.labels), np.load(given.probs))
    classes = load_classes(PREPARED)
    train = ImageSet.concat(labeled, pseudo)
    hard = one_hot(labeled.labels, len(classes)).float()  # the labelled rows' targets stay their labels
    targets = torch.cat([hard, soft]) if p.student.pseudo_targets == "soft" else None
    student = resolve_weights(p.student, PRETRAIN)
    augment = augmenter(p.student.augment, int(labeled.images.shape[1]), p.seed)  # per image, then batched
    with (
        distributed(runtime) as (rank, _),
        tracking.stage_run(
            "student" if i == 0 else f"student@{i}",
            p.mlflow.experiment,
            {"seed": p.seed, **runtime.describe(), "teacher": rnd.teacher, "student": p.student.model_dump()},
            rank,
        ),
    ):
        tracking.log_metrics({"n_labeled": len(labeled), "n_pseudo": len(pseudo)})
        job = Job(
            build_model(student.model(), len(classes), p.seed),
            student.model(),
            student.schedule(),
            model_path,
            curve,
            packing=load_packing(PREPARED),
            config={"student": student.model_dump(), "teacher": rnd.teacher, "seed": p.seed},
        )
        result = train_and_save(
            job,
            train,
            val,
            classes=classes,
            seed=p.seed,
            runtime=runtime,
            augment=augment,
            augment_head=p.student.augment.head_phase,
            feature_cache=FEATURES,
            state=Path(f".sstl-state/train/{rnd.student}.pt"),  # per-epoch resume state: git-ignored, not a DVC output
            targets=targets,
        )
    if rank == 0:
        print(f"{rnd.student}: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {model_path}")


if __name__ == "__main__":
    main()
