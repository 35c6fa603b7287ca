"""Stage finetune: the last round's student fine-tuned on the clean labelled set at a small learning rate.

Under torchrun every process trains on its share of each batch (DDP); rank 0 writes and logs.
"""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import tracking
from sstl.dataset import load_classes, load_packing, load_split
from sstl.errors import stage_main
from sstl.models import ModelConfig, load_checkpoint
from sstl.params import load_params
from sstl.runtime import distributed
from sstl.workflow import Job, train_and_save

PREPARED = Path("data/prepared")
MODEL = Path("models/finetuned.pt")
CURVE = Path("reports/curves/finetuned.csv")


@stage_main
def main() -> None:
    p = load_params()
    runtime = p.runtime("train")
    student = Path(f"models/{p.students()[-1]}.pt")
    model, meta = load_checkpoint(student)
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    classes = load_classes(PREPARED)
    run_params = {"seed": p.seed, **runtime.describe(), "finetune": p.finetune.model_dump()}
    with distributed(runtime) as (rank, _), tracking.stage_run("finetune", p.mlflow.experiment, run_params, rank):
        job = Job(
            model,
            ModelConfig.model_validate(meta["model"]),
            p.finetune.schedule(),
            MODEL,
            CURVE,
            packing=load_packing(PREPARED),
            config={"finetune": p.finetune.model_dump(), "from": str(student), "seed": p.seed},
        )
        result = train_and_save(
            job,
            labeled,
            val,
            classes=classes,
            seed=p.seed,
            runtime=runtime,
            state=Path(".sstl-state/train/finetune.pt"),  # per-epoch resume state: git-ignored, not a DVC output
        )
    if rank == 0:
        print(f"finetune: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
