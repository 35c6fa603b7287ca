"""Committed results are HEAD's results: dvc.lock records exactly this commit's code and params.

Outputs need not be present (a fresh clone has no DVC cache); what must match is every stage's
command, code and params, so the metrics in the commit were produced by the commit. When this
fails: `sstl run`, then commit dvc.lock, reports/ and the README table together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT
from dvc.repo import Repo


def _outputs(root: Path) -> set[str]:
    """Every stage's outputs as DVC resolves them (`foreach` stages expanded: data/pseudolabels/teacher.csv)."""
    with Repo(str(root)) as repo:
        return {out.def_path for stage in repo.index.stages for out in stage.outs}


def _produced(dep: str, outputs: set[str]) -> bool:
    """A dep another stage writes: one of its outputs, or a folder holding some (evaluate's `models`)."""
    return dep in outputs or any(o.startswith(dep.rstrip("/") + "/") for o in outputs)


def stale_stages(root: Path) -> dict[str, list]:
    """Stage -> what differs from dvc.lock, outputs (and deps that are outputs of other stages) aside."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    produced = _outputs(root)
    stale: dict[str, list] = {}
    for stage, changes in json.loads(res.stdout or "{}").items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                stale.setdefault(stage, []).append(change)
            elif "changed deps" in change:
                deps = {k: v for k, v in change["changed deps"].items() if not _produced(k, produced)}
                if deps:
                    stale.setdefault(stage, []).append(deps)
    return stale


def test_dvc_lock_matches_the_committed_code_and_params() -> None:
    stale = stale_stages(ROOT)
    assert not stale, (
        "dvc.lock does not match this tree's code/params: run `sstl run` and commit dvc.lock, reports/ "
        f"and the README table with the change: {stale}"
    )


def test_dvc_lock_has_no_stage_the_pipeline_lost() -> None:
    """A stage renamed or removed in dvc.yaml (e.g. `student` -> the foreach `student@0`) leaves its old
    entry in dvc.lock, which then still claims results for code that no longer runs."""
    with Repo(str(ROOT)) as repo:
        stages = {stage.addressing for stage in repo.index.stages}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked <= stages, f"dvc.lock names stages dvc.yaml does not have: {sorted(locked - stages)}"
