"""Stage student: a larger network on labelled + pseudo-labelled images under strong augmentation."""

from pathlib import Path

from sstl import tracking
from sstl.dataset import ImageSet, load_classes, load_split
from sstl.errors import stage_main
from sstl.files import read_csv
from sstl.params import load_params
from sstl.pretrain import resolve_weights
from sstl.transforms import strong_augment
from sstl.workflow import build_model, pseudo_set, train_and_save

PREPARED = Path("data/prepared")
PRETRAIN = Path("models/pretrain.pt")
PSEUDO = Path("data/pseudolabels.csv")
MODEL = Path("models/student.pt")
CURVE = Path("reports/curves/student.csv")


@stage_main
def main() -> None:
    p = load_params()
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    pseudo = pseudo_set(load_split(PREPARED, "unlabeled"), read_csv(PSEUDO))
    classes = load_classes(PREPARED)
    train = ImageSet.concat(labeled, pseudo)
    student = resolve_weights(p.student, PRETRAIN)
    augment = strong_augment(p.student.augment, p.data.image_size, p.seed)
    with tracking.stage_run(
        "student",
        p.mlflow.experiment,
        {"seed": p.seed, "precision": p.precision.train, "student": p.student.model_dump()},
    ):
        tracking.log_metrics({"n_labeled": len(labeled), "n_pseudo": len(pseudo)})
        model = build_model(student.model(), len(classes), p.seed)
        result = train_and_save(
            model,
            student.model(),
            student.schedule(),
            train,
            val,
            classes,
            p.seed,
            MODEL,
            CURVE,
            augment=augment,
            config={"student": student.model_dump(), "seed": p.seed},
            precision=p.precision.train,
        )
    print(f"student: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
