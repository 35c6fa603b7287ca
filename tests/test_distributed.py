"""Training under torchrun: 2 CPU processes (gloo, DDP) learn what one process learns, and agree on the weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_training import SCHEDULE, TRAIN, VAL, new_model
    from sstl.models.classifier import model_digest
    from sstl.runtime.device import CPU
    from sstl.runtime.distributed import distributed
    from sstl.train.loop import fit
    from sstl.train.setup import FitSetup

    torch.set_num_threads(1)
    with distributed(CPU) as (rank, size):
        model = new_model()  # resnet18, seeded: the same start on every process
        # 40 images in batches of 13: the last batch holds one row, too few for two processes
        schedule = SCHEDULE.model_copy(update={"batch_size": 13})
        result = fit(model, TRAIN, VAL, schedule, FitSetup(num_classes=2, seed=0, runtime=CPU))
        row = {"rank": rank, "size": size, "val_loss": result.best_val_loss, "val_acc": result.best_val_acc,
               "epochs": len(result.history), "digest": model_digest(model)}
        with open(f"{sys.argv[1]}.{rank}", "w") as f:
            json.dump(row, f)
    """
)


def run(tmp_path: Path, nproc: int) -> list[dict]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"out{nproc}"
    tests = str(Path(__file__).parent)
    cmd = [sys.executable, str(script), str(out), tests]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


def test_two_processes_learn_the_same_as_one(tmp_path: Path) -> None:
    (one,) = run(tmp_path, 1)
    two = run(tmp_path, 2)
    assert [r["size"] for r in two] == [2, 2] and one["size"] == 1
    assert two[0]["digest"] == two[1]["digest"], "every process ends with the same weights (and BN statistics)"
    assert two[0]["epochs"] == two[1]["epochs"], "early stopping decided alike on every process"
    assert one["val_acc"] >= 0.9 and two[0]["val_acc"] >= 0.9, (one, two[0])
    # the same problem, the same global batch, gradients averaged: the same quality within noise
    assert abs(one["val_loss"] - two[0]["val_loss"]) <= 0.15, (one, two[0])
    assert one["digest"] != two[0]["digest"], "two processes really ran: each batch was split between them"
