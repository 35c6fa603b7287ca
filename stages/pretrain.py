"""Stage pretrain: rotation prediction on the unlabelled pool (optional; pretrain.enabled).

`python stages/pretrain.py --data data/prepared --model models/pretrain.pt --curve reports/curves/pretrain.csv`
"""

import argparse
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.core.files import write_csv
from sstl.data.dataset import load_images
from sstl.eval import health
from sstl.models.checkpoint import save_checkpoint
from sstl.params import load_params
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.track import tracking
from sstl.train.pretrain import ROTATIONS, pretrain_rotation, write_disabled


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_paths(parser, inputs=["data"], outputs=["model", "curve"])
    args = parse_paths(parser)
    p = load_params()
    if not p.pretrain.enabled:
        write_disabled(args.model)
        write_csv(args.curve, [], ("epoch",))
        print("pretrain: disabled (pretrain.enabled=false)")
        return
    runtime = p.runtime("train")
    pool = load_images(args.data, "unlabeled")
    with tracking.stage_run(
        "pretrain",
        p.mlflow.experiment,
        {"seed": p.seed, **runtime.describe(), "pretrain": p.pretrain.model_dump()},
    ):
        model, model_cfg, result = pretrain_rotation(
            pool,
            p.pretrain,
            seed=p.seed,
            on_epoch=tracking.log_epoch,
            runtime=runtime,
            state=Path(".sstl-state/train/pretrain.pt"),
        )
        size = int(pool.shape[1])
        save_checkpoint(args.model, model, model_cfg, list(ROTATIONS), size, config=p.pretrain.model_dump())
        write_csv(args.curve, [{k: v for k, v in row.items() if k != "seconds"} for row in result.history])
        tracking.log_metrics({"rotation_val_acc": result.best_val_acc, "train_seconds": result.seconds})
        warnings = [w for w in [health.at_chance(result.best_val_acc, len(ROTATIONS))] if w]
        tracking.set_tags({"sstl.warnings": "; ".join(warnings) or "none"})
    print(f"pretrain: rotation val_acc={result.best_val_acc:.4f} -> {args.model}")
    health.warn("pretrain", warnings)


if __name__ == "__main__":
    main()
