"""Stage finetune: the student fine-tuned on the clean labelled set at a small learning rate."""

from pathlib import Path

from sstl import tracking
from sstl.dataset import load_classes, load_split
from sstl.errors import stage_main
from sstl.models import ModelConfig, load_checkpoint
from sstl.params import load_params
from sstl.workflow import train_and_save

PREPARED = Path("data/prepared")
STUDENT = Path("models/student.pt")
MODEL = Path("models/finetuned.pt")
CURVE = Path("reports/curves/finetuned.csv")


@stage_main
def main() -> None:
    p = load_params()
    model, meta = load_checkpoint(STUDENT)
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    classes = load_classes(PREPARED)
    with tracking.stage_run(
        "finetune",
        p.mlflow.experiment,
        {"seed": p.seed, "precision": p.precision.train, "finetune": p.finetune.model_dump()},
    ):
        result = train_and_save(
            model,
            ModelConfig.model_validate(meta["model"]),
            p.finetune.schedule(),
            labeled,
            val,
            classes,
            p.seed,
            MODEL,
            CURVE,
            config={"finetune": p.finetune.model_dump(), "from": str(STUDENT), "seed": p.seed},
            precision=p.precision.train,
        )
    print(f"finetune: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
