"""Stage tune: scikit-optimize over the teacher's search space; objective = validation loss.

With tune.frozen_backbone the trials train the head alone on backbone features computed once
(cached in FEATURES, which the teacher stage reuses for its own phase 1).

`python stages/tune.py --data data/prepared --pretrain models/pretrain.pt --best reports/tune/best_params.json
--trials reports/tune/trials.csv --convergence reports/tune/convergence.csv`
"""

import argparse
import math
import shutil
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.core.files import write_csv, write_json
from sstl.data.dataset import load_classes, load_split
from sstl.models.weights import resolve_weights
from sstl.params import load_params
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.pipeline.train import FEATURES
from sstl.pipeline.tune import TeacherSearch, tune_teacher
from sstl.track import tracking
from sstl.train.tune import best_params

STATE = Path(".sstl-state/tune")


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_paths(parser, inputs=["data", "pretrain"], outputs=["best", "trials", "convergence"])
    args = parse_paths(parser)
    p = load_params()
    runtime = p.runtime("train")
    labeled, val = load_split(args.data, "labeled"), load_split(args.data, "val")
    classes = load_classes(args.data)
    run_params = {"seed": p.seed, **runtime.describe(), "tune": p.tune.model_dump(), "teacher": p.teacher.model_dump()}
    with tracking.stage_run("tune", p.mlflow.experiment, run_params):
        if not p.tune.enabled:  # the outputs exist all the same: DVC's outs are static
            write_csv(args.trials, [], ("trial", "val_loss"))
            write_csv(args.convergence, [], ("trial", "val_loss", "best_so_far"))
            write_json(args.best, {})
            print("tune: disabled (tune.enabled: false): the teacher keys are used as given")
            return
        job = TeacherSearch(
            teacher=resolve_weights(p.teacher, args.pretrain),
            space=p.tune.space,
            trials=(p.tune.n_random, p.tune.n_guided),
            num_classes=len(classes),
            seed=p.seed,
            runtime=runtime,
            frozen_backbone=p.tune.frozen_backbone,
        )
        # finished trials + the running trial's epochs: resume after a kill
        trials = tune_teacher(job, labeled, val, feature_cache=FEATURES, state_dir=STATE)
        best = best_params(trials, list(p.tune.space))
        write_csv(args.trials, trials)
        write_csv(args.convergence, [{k: t[k] for k in ("trial", "val_loss", "best_so_far")} for t in trials])
        write_json(args.best, best)
        tracking.log_artifacts(args.best, args.trials, args.convergence)
    shutil.rmtree(STATE, ignore_errors=True)  # done: `dvc repro -f tune` searches again rather than replays
    winner = min(t["val_loss"] for t in trials if math.isfinite(t["val_loss"]))  # best_params: at least one
    print(f"tune: best of {len(trials)} trials: val_loss={winner:.4f} {best}")


if __name__ == "__main__":
    main()
