"""Reliability: SIGKILL `dvc repro` while each training stage runs; the re-run must resume and reproduce.

    python benchmarks/reliability.py [--kills 3] [--stages tune,teacher] [--keep]

In a temporary copy of the project (a git repo with DVC, like tests/test_pipeline_e2e.py) on the demo
data with small overrides (FAST): one uninterrupted `dvc repro` gives the reference metrics, outputs
(the md5 of every out in dvc.lock) and each stage's duration. Then, per stage, `--kills` times: a
forced run of that stage (`dvc repro -f -s`) is SIGKILLed, process group and all, a random 0.5 s to
90 % of the stage's reference duration after DVC prints `Running stage '<name>'`; a plain re-run
(`dvc repro`) must finish, print a resume line, and leave every output and metric identical.

Work lost = seconds from the last state file written before the kill (or the stage's start) to the
kill: what the re-run trains again. A kill that lands while DVC writes dvc.lock can leave it
empty: that is detected, counted and repaired from the reference copy.
Both runs use --no-run-cache: otherwise DVC may restore the reference outputs from its run cache
and the resume would not be exercised.
Writes reports/benchmarks/reliability.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stamp import stamp  # noqa: E402

OUT = ROOT / "reports/benchmarks"
STAGES = ("pretrain", "tune", "teacher", "pseudolabel@0", "student@0", "finetune")  # @0: the first round
STATE = {  # where each stage saves its progress (relative to the project)
    "pretrain": ".sstl-state/train/pretrain.pt",
    "tune": ".sstl-state/tune",
    "teacher": ".sstl-state/train/teacher.pt",
    "pseudolabel@0": ".sstl-state/pseudolabel/teacher",
    "student@0": ".sstl-state/train/student.pt",
    "finetune": ".sstl-state/train/finetune.pt",
}
FAST = {  # params.yaml overrides: a few epochs per stage, several state saves each
    "pretrain": {"enabled": True, "epochs": 3, "max_images": 400, "batch_size": 64},
    "tune": {"n_random": 3, "n_guided": 2, "space": {"epochs": {"low": 2, "high": 4}}},
    "teacher": {"head_epochs": 1, "epochs": 4},
    "pseudolabel": {"top_k": 40, "shard_size": 128},
    "student": {"arch": "resnet18", "epochs": 4},
    "finetune": {"epochs": 3},
}
RESUMED = re.compile(r"resum")  # fit: "resuming from epoch", tune: "resuming after trial", pseudolabel: "resumes"


@dataclass
class Repro:
    """One `dvc repro`: its output lines with wall times, exit code, stage start times and the kill."""

    rc: int
    lines: list[tuple[float, str]]
    starts: dict[str, float] = field(default_factory=dict)  # stage -> wall time of "Running stage"
    killed_at: float | None = None
    seconds: float = 0.0

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def env(project: Path) -> dict[str, str]:
    """The venv's dvc and python, a private MLflow store, no progress bars, unbuffered prints."""
    return os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def sh(project: Path, *cmd: str) -> str:
    res = subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def make_project(root: Path) -> Path:
    """A copy of the pipeline (code, dvc.yaml, FAST params) in a fresh git + DVC repo, committed once:
    HEAD, which checkpoints record, stays the same for the reference and every re-run."""
    project = root / "project"
    project.mkdir()
    for item in ("stages", "src", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, project / item)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), FAST)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/.sstl-state/\n__pycache__/\n")
    sh(project, "git", "init", "-q", "-b", "main")
    sh(project, "git", "config", "user.email", "bench@example.com")
    sh(project, "git", "config", "user.name", "bench")
    sh(project, sys.executable, "-m", "dvc", "init", "-q")
    sh(project, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "reliability benchmark")
    return project


def repro(project: Path, *args: str, kill: str | None = None, delay: float = 0.0) -> Repro:
    """Run `dvc repro *args`; with `kill`, SIGKILL its process group `delay` s after that stage starts."""
    cmd = [sys.executable, "-m", "dvc", "repro", *args]
    start = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the stage's python dies with dvc
    )
    run = Repro(rc=0, lines=[])
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            run.lines.append((now, line.rstrip()))
            found = re.search(r"Running stage '([\w@-]+)'", line)
            if found:
                run.starts[found.group(1)] = now
                if found.group(1) == kill:
                    started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill is not None:
        while not started.wait(0.02) and proc.poll() is None:
            pass
        if started.is_set():
            deadline = run.starts[kill] + delay
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
            if proc.poll() is None:
                run.killed_at = time.time()
                os.killpg(proc.pid, signal.SIGKILL)
    run.rc = proc.wait()
    reader.join(timeout=10)
    _wait_group_gone(proc.pid)
    run.seconds = time.time() - start
    return run


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of the group is left (the stage's python must not write after the kill)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


def stage_seconds(run: Repro) -> dict[str, float]:
    """Each stage's duration in an uninterrupted run: from its start to the next stage's (or the end)."""
    order = sorted(run.starts.items(), key=lambda kv: kv[1])
    ends = [t for _, t in order[1:]] + [run.lines[-1][0] if run.lines else time.time()]
    return {name: round(end - t, 2) for (name, t), end in zip(order, ends, strict=True)}


def lock_outs(project: Path) -> dict[str, str] | None:
    """{out path: md5} over every stage of dvc.lock; None when the lock is empty or unreadable."""
    try:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        stages = lock["stages"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return None
    outs = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out.get("md5", "")
    return outs


def same_content(project: Path, out: str, reference_md5: str) -> bool:
    """Whether a .pt output holds what the reference held (weights, config, figures).

    torch.save names the zip archive's folder after the file it writes, and checkpoints are written
    to a random temp name (atomic_path), so equal checkpoints differ in a few bytes from run to run.
    The reference copy is read from DVC's cache."""
    if not out.endswith(".pt") or not (project / out).is_file():
        return False
    import torch

    cached = project / ".dvc/cache/files/md5" / reference_md5[:2] / reference_md5[2:]
    if not cached.is_file():
        return False
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    return _equal(load(cached), load(project / out))


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def work_lost(project: Path, stage: str, run: Repro) -> float:
    """Seconds from the newest state file written during this run's stage (or the stage's start) to the kill."""
    assert run.killed_at is not None
    begun = run.starts[stage]
    path = project / STATE[stage]
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.is_file() else []
    saved = [p.stat().st_mtime for p in files if p.stat().st_mtime >= begun]
    return round(run.killed_at - max([begun, *saved]), 2)


def inject(project: Path, stage: str, reference: dict[str, Any], max_delay: float) -> dict[str, Any] | None:
    """Kill a forced run of `stage`, re-run the pipeline, compare with the reference; None if the stage
    ended before the kill."""
    if stage == "tune":  # a finished search is replayed from its trials file: start it afresh
        shutil.rmtree(project / STATE["tune"], ignore_errors=True)
    delay = random.uniform(0.5, max(0.6, max_delay))
    killed = repro(project, "-f", "-s", "--no-run-cache", stage, kill=stage, delay=delay)
    if killed.killed_at is None:
        return None
    lost = work_lost(project, stage, killed)
    damaged = lock_outs(project) is None
    if damaged:
        (project / "dvc.lock").write_text(reference["lock"])
    again = repro(project, "--no-run-cache")
    metrics = (project / "reports/metrics.json").read_bytes() if (project / "reports/metrics.json").is_file() else b""
    outs = lock_outs(project) or {}
    other_bytes = sorted(k for k, md5 in reference["outs"].items() if outs.get(k) != md5)
    different = [k for k in other_bytes if not same_content(project, k, reference["outs"][k])]
    return {
        "delay_s": round(delay, 2),
        "work_lost_s": lost,
        "lock_damaged": damaged,
        "rerun_ok": again.rc == 0,
        "resumed": bool(RESUMED.search(again.text())),
        "metrics_identical": metrics == reference["metrics"],
        "outputs_identical": not different,
        "different_outputs": different,
        "same_content_other_bytes": sorted(set(other_bytes) - set(different)),
        "rerun_s": round(again.seconds, 1),
        "rerun_tail": again.text()[-1500:] if again.rc != 0 else "",
    }


def build_reference(project: Path) -> tuple[dict[str, Any], Repro]:
    """The uninterrupted pipeline: its metrics, dvc.lock (text and out md5s) and stage durations."""
    if "data/inventory.json" in (project / "dvc.yaml").read_text():  # prepare depends on the folder's fingerprint
        first = repro(project, "demo")
        if first.rc != 0:
            raise SystemExit(f"dvc repro demo failed:\n{first.text()[-3000:]}")
        sh(project, sys.executable, "stages/prepare.py", "--refresh")
    run = repro(project)
    if run.rc != 0:
        raise SystemExit(f"reference dvc repro failed:\n{run.text()[-3000:]}")
    outs = lock_outs(project)
    assert outs is not None
    reference = {
        "metrics": (project / "reports/metrics.json").read_bytes(),
        "lock": (project / "dvc.lock").read_text(),
        "outs": outs,
        "stage_seconds": stage_seconds(run),
        "pipeline_seconds": round(run.seconds, 1),
    }
    return reference, run


def summarise(stage: str, trials: list[dict[str, Any]], missed: int, ref_seconds: float) -> dict[str, Any]:
    lost = [t["work_lost_s"] for t in trials]
    return {
        "stage": stage,
        "reference_stage_s": ref_seconds,
        "faults_injected": len(trials),
        "missed": missed,  # the stage ended before the kill: not counted as a fault
        "resumed": sum(t["resumed"] for t in trials),
        "rerun_ok": sum(t["rerun_ok"] for t in trials),
        "identical": sum(t["metrics_identical"] and t["outputs_identical"] for t in trials),
        "lock_damaged": sum(t["lock_damaged"] for t in trials),
        "work_lost_s_mean": round(sum(lost) / len(lost), 2) if lost else None,
        "work_lost_s_max": max(lost) if lost else None,
        "trials": trials,
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        "# Reliability: SIGKILL during each stage, then `dvc repro`",
        "",
        f"`python benchmarks/reliability.py --kills {r['kills']}` — demo data with the FAST overrides "
        f"(`{json.dumps(r['overrides'])}`); reference pipeline {r['pipeline_seconds']} s. Kills land a random "
        "0.5 s to 90 % of the stage's reference duration after DVC starts it (process group, SIGKILL); the "
        "re-run is a plain `dvc repro --no-run-cache`. Work lost: seconds since the stage's last saved state "
        "(or its start) at the kill.",
        f"Machine: {r['machine']}; date {r['date']}; commit {r['commit']}; {r.get('environment', '')}; "
        f"total {r['total_minutes']} min.",
        "",
        "| stage | stage s (reference) | faults | resumed | re-run ok | outputs + metrics identical | "
        "dvc.lock damaged | work lost s (mean / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        lost = "-" if s["work_lost_s_mean"] is None else f"{s['work_lost_s_mean']} / {s['work_lost_s_max']}"
        lines.append(
            f"| {s['stage']} | {s['reference_stage_s']} | {s['faults_injected']} | {s['resumed']} | "
            f"{s['rerun_ok']} | {s['identical']} | {s['lock_damaged']} | {lost} |"
        )
    lines += [
        "",
        "Identical: every DVC output as in the reference (md5 in dvc.lock) and reports/metrics.json byte for "
        "byte; the JSON lists under `same_content_other_bytes` any .pt whose bytes differ but whose weights and "
        "metadata are equal (none since checkpoints are written through a file object).",
        "Faults that land before the stage's first state save (its process still starting) resume nothing "
        "and lose only that start; `missed` in the JSON counts kills that came after the stage had ended.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="faults injected per stage")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    ap.add_argument("--out", type=Path, default=OUT, help="where reliability.{md,json} go")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")
    random.seed(args.seed)
    begin = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="sstl-reliability-"))
    try:
        project = make_project(tmp)
        reference, _ = build_reference(project)
        print(f"reference: {reference['pipeline_seconds']} s, stages {reference['stage_seconds']}", flush=True)
        results = []
        for stage in stages:
            seconds = reference["stage_seconds"].get(stage, 0.0)
            trials: list[dict[str, Any]] = []
            missed = 0
            while len(trials) < args.kills and missed < 2 * args.kills:
                trial = inject(project, stage, reference, 0.9 * seconds)
                if trial is None:
                    missed += 1
                    continue
                trials.append(trial)
                print(f"{stage}: {trial}", flush=True)
            results.append(summarise(stage, trials, missed, seconds))
    finally:
        if args.keep:
            print(f"project kept in {tmp / 'project'}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    record = {
        **stamp(),
        "kills": args.kills,
        "seed": args.seed,
        "overrides": FAST,
        "pipeline_seconds": reference["pipeline_seconds"],
        "reference_stage_seconds": reference["stage_seconds"],
        "total_minutes": round((time.time() - begin) / 60, 1),
        "stages": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "reliability.md").write_text(render(record))
    print(render(record))


if __name__ == "__main__":
    main()
