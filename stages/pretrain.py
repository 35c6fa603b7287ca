"""Stage pretrain: rotation prediction on the unlabelled pool (optional; pretrain.enabled)."""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import health, tracking
from sstl.dataset import load_images
from sstl.errors import stage_main
from sstl.files import write_csv
from sstl.models import save_checkpoint
from sstl.params import load_params
from sstl.pretrain import ROTATIONS, pretrain_rotation, write_disabled

PREPARED = Path("data/prepared")
MODEL = Path("models/pretrain.pt")
CURVE = Path("reports/curves/pretrain.csv")


@stage_main
def main() -> None:
    p = load_params()
    if not p.pretrain.enabled:
        write_disabled(MODEL)
        write_csv(CURVE, [], ("epoch",))
        print("pretrain: disabled (pretrain.enabled=false)")
        return
    runtime = p.runtime("train")
    pool = load_images(PREPARED, "unlabeled")
    with tracking.stage_run(
        "pretrain",
        p.mlflow.experiment,
        {"seed": p.seed, **runtime.describe(), "pretrain": p.pretrain.model_dump()},
    ):
        model, model_cfg, result = pretrain_rotation(
            pool, p.pretrain, p.seed, tracking.log_epoch, runtime, state=Path(".sstl-state/train/pretrain.pt")
        )
        save_checkpoint(MODEL, model, model_cfg, list(ROTATIONS), int(pool.shape[1]), config=p.pretrain.model_dump())
        write_csv(CURVE, [{k: v for k, v in row.items() if k != "seconds"} for row in result.history])
        tracking.log_metrics({"rotation_val_acc": result.best_val_acc, "train_seconds": result.seconds})
        warnings = [w for w in [health.at_chance(result.best_val_acc, len(ROTATIONS))] if w]
        tracking.set_tags({"sstl.warnings": "; ".join(warnings) or "none"})
    print(f"pretrain: rotation val_acc={result.best_val_acc:.4f} -> {MODEL}")
    health.warn("pretrain", warnings)


if __name__ == "__main__":
    main()
