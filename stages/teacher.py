"""Stage teacher: transfer learning on the labelled set with the tuned hyperparameters, no augmentation."""

from pathlib import Path

from sstl import tracking
from sstl.dataset import load_classes, load_split
from sstl.errors import stage_main
from sstl.files import read_json
from sstl.params import TeacherParams, load_params
from sstl.pretrain import resolve_weights
from sstl.workflow import build_model, train_and_save

PREPARED = Path("data/prepared")
PRETRAIN = Path("models/pretrain.pt")
BEST = Path("reports/tune/best_params.json")
MODEL = Path("models/teacher.pt")
CURVE = Path("reports/curves/teacher.csv")


@stage_main
def main() -> None:
    p = load_params()
    cfg = resolve_weights(TeacherParams.model_validate({**p.teacher.model_dump(), **read_json(BEST)}), PRETRAIN)
    labeled, val = load_split(PREPARED, "labeled"), load_split(PREPARED, "val")
    classes = load_classes(PREPARED)
    with tracking.stage_run(
        "teacher", p.mlflow.experiment, {"seed": p.seed, "precision": p.precision.train, "teacher": cfg.model_dump()}
    ):
        model = build_model(cfg.model(), len(classes), p.seed)
        result = train_and_save(
            model,
            cfg.model(),
            cfg.schedule(),
            labeled,
            val,
            classes,
            p.seed,
            MODEL,
            CURVE,
            config={"teacher": cfg.model_dump(), "seed": p.seed},
            precision=p.precision.train,
        )
    print(f"teacher: val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
