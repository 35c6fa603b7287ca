"""Stage teacher: transfer learning on the labelled set with the tuned hyperparameters, no augmentation.

Under torchrun (`torchrun --nproc_per_node N stages/teacher.py`) every process trains on its share
of each batch (DDP) and rank 0 writes the model and logs to MLflow.
"""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import tracking
from sstl.dataset import load_classes, load_packing, load_split
from sstl.errors import stage_main
from sstl.files import read_json
from sstl.params import TeacherParams, load_params
from sstl.pretrain import resolve_weights
from sstl.runtime import distributed
from sstl.transforms import augmenter
from sstl.workflow import Job, build_model, train_and_save

PREPARED = Path("data/prepared")
PRETRAIN = Path("models/pretrain.pt")
BEST = Path("reports/tune/best_params.json")
MODEL = Path("models/teacher.pt")
CURVE = Path("reports/curves/teacher.csv")
FEATURES = Path(".sstl-state/features")  # backbone features for phase 1: git-ignored cache, shared with tune


@stage_main
def main() -> None:
    p = load_params()
    runtime = p.runtime("train")
    cfg = resolve_weights(TeacherParams.model_validate({**p.teacher.model_dump(), **read_json(BEST)}), PRETRAIN)
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    classes = load_classes(PREPARED)
    with (
        distributed(runtime) as (rank, _),
        tracking.stage_run(
            "teacher", p.mlflow.experiment, {"seed": p.seed, **runtime.describe(), "teacher": cfg.model_dump()}, rank
        ),
    ):
        job = Job(
            build_model(cfg.model(), len(classes), p.seed),
            cfg.model(),
            cfg.schedule(),
            MODEL,
            CURVE,
            packing=load_packing(PREPARED),
            config={"teacher": cfg.model_dump(), "seed": p.seed},
        )
        result = train_and_save(
            job,
            labeled,
            val,
            classes=classes,
            seed=p.seed,
            runtime=runtime,
            augment=None if cfg.augment is None else augmenter(cfg.augment, int(labeled.images.shape[1]), p.seed),
            augment_head=cfg.augment is None or cfg.augment.head_phase,
            feature_cache=FEATURES,
            state=Path(".sstl-state/train/teacher.pt"),  # per-epoch resume state: git-ignored, not a DVC output
        )
    if rank == 0:
        print(f"teacher: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
