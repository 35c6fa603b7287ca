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


def _outputs(dvc_yaml: Path) -> set[str]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    entries = [e for s in stages.values() for key in ("outs", "metrics", "plots") for e in s.get(key, [])]
    return {next(iter(e)) if isinstance(e, dict) else str(e) for e in entries}


def stale_stages(root: Path) -> dict[str, list]:
    """Stage -> what differs from dvc.lock, outputs (and deps that are outputs of other stages) aside."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    produced = _outputs(root / "dvc.yaml")
    stale: dict[str, list] = {}
    for stage, changes in json.loads(res.stdout or "{}").items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                stale.setdefault(stage, []).append(change)
            elif "changed deps" in change:
                deps = {k: v for k, v in change["changed deps"].items() if k not in produced}
                if deps:
                    stale.setdefault(stage, []).append(deps)
    return stale


def test_dvc_lock_matches_the_committed_code_and_params() -> None:
    stale = stale_stages(ROOT)
    assert not stale, (
        "dvc.lock does not match this tree's code/params: run `sstl run` and commit dvc.lock, reports/ "
        f"and the README table with the change: {stale}"
    )
