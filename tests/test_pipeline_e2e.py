"""End to end: the real `dvc repro` / `dvc exp` / `dvc push|pull` on a tiny config in a temporary git repo.

The tests of this module run in order on one project: build, no-op, partial re-run, experiment,
push / clone / pull, determinism, MLflow grouping.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

pytestmark = pytest.mark.e2e

TINY = {
    "demo": {"labels_per_class": 6},
    "data": {"image_size": 16},
    "tune": {
        "n_random": 2,
        "n_guided": 1,
        "space": {"lr": {"low": 0.001, "high": 0.01, "prior": "log-uniform"}, "epochs": {"low": 1, "high": 2}},
    },
    "teacher": {"head_epochs": 1, "epochs": 2, "batch_size": 32},
    "pseudolabel": {"top_k": 10},
    "student": {"arch": "resnet18", "epochs": 2},
    "finetune": {"epochs": 1},
}
MODELS = ("teacher", "student", "finetuned")
PROBES = ("probe",)  # teacher and student share resnet18 without weights here: one backbone, one probe


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "space" else v
    return out


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _dvc_env() -> dict[str, str]:
    return os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args, env=_dvc_env())


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # this module's own MLflow store: the worker's store also holds the runs of the modules pytest-xdist
    # gave the same worker earlier, and the assertions below are about this project's history alone
    store = pytest.MonkeyPatch()
    store.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow-e2e') / 'mlflow.db'}")
    try:
        yield baseline(tmp_path_factory.mktemp("project"))
    finally:
        store.undo()


def baseline(repo: Path) -> Path:
    """The demo project at the test params, reproduced once and committed."""
    for item in ("stages", "src", "dvc.yaml", ".dvcignore", "data/inventory.json"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (repo / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, repo / item)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n__pycache__/\n/.sstl-state/\n")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "ci@example.com")
    sh(repo, "git", "config", "user.name", "ci")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    out = dvc(repo, "repro")
    assert ran_stages(out) == {
        "demo",
        "prepare",
        "pretrain",
        "tune",
        "probe",
        "teacher",
        "pseudolabel@0",  # one round (params `rounds`), expanded by DVC's foreach
        "student@0",
        "finetune",
        "evaluate",
    }
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    return repo


def test_repro_writes_metrics_for_every_model_and_split(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == set(MODELS) | set(PROBES)
    for model in MODELS:
        for split in ("test", "test-add"):
            assert 0.0 <= metrics[model][split]["accuracy"] <= 1.0
            assert set(metrics[model][split]) == {"accuracy", "macro_f1", "ece"}
    for name in MODELS:
        assert (project / f"models/{name}.pt").is_file()
        assert (project / f"reports/curves/{name}.csv").read_text().startswith("phase,lr,")
    assert len((project / "reports/tune/trials.csv").read_text().splitlines()) == 1 + 3


def test_the_probe_is_fitted_on_the_teachers_rows_and_stands_beside_the_models(project: Path) -> None:
    report = json.loads((project / "reports/probe.json").read_text())
    manifest = list(csv.DictReader((project / "data/prepared/manifest.csv").open()))
    labeled = [r["path"] for r in manifest if r["split"] == "labeled"]  # what the teacher trains on
    assert list(report["probes"]) == list(PROBES)
    probe = report["probes"]["probe"]
    smallest = min(Counter(r["label"] for r in manifest if r["split"] == "labeled").values())
    assert probe["paths"] == labeled and probe["rows"] == len(labeled)
    assert probe["folds"] == min(5, smallest), "k-fold, k capped by the smallest class's labelled rows"
    grid = yaml.safe_load((project / "params.yaml").read_text())["probe"]["C"]
    assert sorted(float(c) for c in probe["cv_accuracy"]) == sorted(grid)  # every C cross-validated
    assert probe["cv_accuracy"][f"{probe['C']:g}"] == max(probe["cv_accuracy"].values())  # the best one chosen
    health = json.loads((project / "reports/health.json").read_text())
    assert set(health["baseline"]) == set(PROBES) and health["use"] in MODELS  # a probe is never the model to use
    assert health["baseline"]["probe"]["rows"] == len(labeled)
    summary = (project / "reports/summary.md").read_text()
    assert "| probe |" in summary and "- baseline: probe = frozen resnet18 (weights: none)" in summary
    assert "baseline: probe" in (project / "reports/model_card.md").read_text()


def test_second_repro_does_nothing(project: Path) -> None:
    out = dvc(project, "repro")
    assert ran_stages(out) == set()
    assert "up to date" in dvc(project, "status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300  # MLflow imports and loads the model first: slow on a busy machine
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                assert r.status == 200
                return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(1)


def test_a_fresh_clone_runs_every_readme_command_after_sstl_run(project: Path, tmp_path: Path) -> None:
    # a new user's first hour: clone, `sstl run`, then serve, predict, report and ui. DVC restores the demo
    # photos from the shared cache and skips tune and evaluate, whose results are committed; prepare through
    # finetune have outputs it cannot restore (persist: true keeps a stage off the run cache) and run again
    # from scratch: same params and seed, the same bytes, so dvc.lock (the md5 of every output) is unchanged.
    # fp32 (runs before the bf16 experiments): CPU bf16 kernels may differ in the last bits of a weight
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    dvc(clone, "cache", "dir", "--local", str(project / ".dvc" / "cache"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the clone's own, new store
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    sstl = [sys.executable, "-m", "sstl.cli"]
    out = sh(clone, *sstl, "run", env=env)
    assert ran_stages(out) == {"prepare", "pretrain", "probe", "teacher", "pseudolabel@0", "student@0", "finetune"}
    assert (clone / "dvc.lock").read_text() == (project / "dvc.lock").read_text(), "a re-run changed an output"
    use = json.loads((clone / "reports/health.json").read_text())["use"]
    assert f"registered sstl ({use}, from the committed results): promoted champion" in out
    photo = next((clone / "data/demo/test").glob("*/*.png"))
    port = free_port()
    server = subprocess.Popen([*sstl, "serve", "--port", str(port)], cwd=clone, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", server, "sstl serve")
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[b64encode(photo.read_bytes()).decode()]]}}
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())["predictions"][0]
        classes = json.loads((clone / "data/prepared/classes.json").read_text())
        assert answer["class"] in classes and set(answer["probabilities"]) == set(classes)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    predicted = sh(clone, *sstl, "predict", str(photo), "--format", "json", env=env)
    assert json.loads(predicted)[0]["predictions"][0]["class"] == answer["class"]  # the model serve serves
    assert "| teacher |" in sh(clone, *sstl, "report", env=env)
    port = free_port()
    ui = subprocess.Popen([*sstl, "ui", "--port", str(port)], cwd=clone, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", ui, "sstl ui")
        ui.send_signal(signal.SIGHUP)  # the terminal closed: the server goes with it, the port is free
        assert ui.wait(timeout=60) == 0
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its closed connections may linger
            s.bind(("127.0.0.1", port))  # in TIME_WAIT; a listener left behind would still fail this
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)


def test_a_bad_param_under_plain_dvc_repro_loses_no_uncached_output(project: Path) -> None:
    # DVC removes a stage's outputs before running it; the uncached ones (cache: false) have no copy to
    # come back from, so they persist until the stage rewrites them (atomically), and a stage that stops
    # on a bad param leaves them as they were
    kept = [project / f"reports/tune/{f}" for f in ("best_params.json", "trials.csv", "convergence.csv")]
    before = [f.read_bytes() for f in kept]
    params = project / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["teacher"]["lr"] = -1.0  # tune, the first stage whose params change, stops on it
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True, env=_dvc_env()
        )
    finally:
        params.write_text(original)
    assert res.returncode != 0 and "teacher.lr" in res.stdout + res.stderr
    assert [f.read_bytes() for f in kept] == before
    assert "up to date" in dvc(project, "status")


def test_a_module_change_reruns_exactly_the_stages_that_import_it(project: Path) -> None:
    # eval/report.py: evaluate imports it, and pretrain through eval/health (its rule text); pretrain's
    # output comes out byte for byte the same, so nothing downstream re-runs. data/images.py: prepare, likewise,
    # and evaluate (the served model decodes requests with it).
    touched = (
        ("src/sstl/eval/report.py", {"pretrain", "evaluate"}),
        ("src/sstl/data/images.py", {"prepare", "evaluate"}),
    )
    for module, stages in touched:
        path = project / module
        path.write_text(path.read_text() + "\n# touched\n")
        assert ran_stages(dvc(project, "repro")) == stages, module
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "touch eval/report.py and data/images.py")


def test_a_change_to_the_training_loop_leaves_demo_and_prepare_alone(project: Path) -> None:
    # the config classes are a torch-free leaf (sstl.config): params no longer imports the training loop,
    # so the stages that do not train do not depend on it
    loop = project / "src/sstl/train/loop.py"
    original = loop.read_text()
    loop.write_text(original + "\n# touched\n")
    try:
        changed = {line.rstrip(":").strip() for line in dvc(project, "status").splitlines() if line.endswith(":")}
    finally:
        loop.write_text(original)
    assert {"pretrain", "tune", "teacher", "student@0", "finetune"} <= changed, changed
    assert not {"demo", "prepare", "probe", "pseudolabel@0", "evaluate"} & changed, changed
    assert "up to date" in dvc(project, "status")


def test_student_param_change_reruns_only_downstream(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["student"]["dropout"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(dvc(project, "repro")) == {"student@0", "finetune", "evaluate"}
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "student dropout 0.3")


def _mount(folder: Path, options: str) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root in the sandbox) for a real read-only or full disk: {res.stderr!r}")


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ("ro", "error: cannot write to models/: read-only file system: make it writable"),
        ("size=64k", "MB needed: free some space"),
    ],
)
def test_an_unwritable_or_full_models_folder_stops_the_teacher_before_training(
    project: Path, options: str, line: str
) -> None:
    _mount(project / "models", options)
    try:
        # the stage's own command, as dvc.yaml gives it (DVC would add its own lines around the error)
        cmd = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["teacher"]["cmd"].split()
        assert cmd[0] == "python"
        res = subprocess.run([sys.executable, *cmd[1:]], cwd=project, capture_output=True, text=True)
    finally:
        subprocess.run(["umount", str(project / "models")], check=True)
    assert res.returncode == 1
    assert line in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and "teacher:" not in res.stdout  # no training happened
    assert "up to date" in dvc(project, "status")  # the real models/ untouched


def test_queued_experiments_run_in_parallel_on_their_own_code_into_one_store(project: Path) -> None:
    # the workspace's report.py marks summaries; the installed sstl (this checkout) does not: a
    # queued experiment must run the code of its own tree
    report = project / "src/sstl/eval/report.py"
    original = report.read_text()
    report.write_text(
        original.replace('return "\\n".join(lines) + "\\n"', 'return "\\n".join(lines) + "\\nqueued-tree\\n"', 1)
    )
    assert report.read_text() != original
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for name, bins in (("q1", 10), ("q2", 20)):
        sh(
            project,
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            f"evaluate.ece_bins={bins}",
            "--name",
            name,
            env=env,
        )
    report.write_text(original)
    # the workers DVC starts outlive the command and keep its output open: not captured
    start = [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"]
    subprocess.run(start, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    deadline = time.monotonic() + 600
    while True:
        status = sh(project, sys.executable, "-m", "dvc", "queue", "status", env=env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    sh(project, sys.executable, "-m", "dvc", "queue", "stop", env=env)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status
    refs = sh(project, "git", "for-each-ref", "refs/exps", "--format=%(refname:short) %(objectname)")
    revs = {line.split()[0].rsplit("/", 1)[-1]: line.split()[1] for line in refs.splitlines()}
    for name in ("q1", "q2"):
        assert "queued-tree" in sh(project, "git", "show", f"{revs[name]}:reports/summary.md"), name
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sstl")
    runs = client.search_runs([experiment.experiment_id])
    pipelines = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("sstl.kind") == "pipeline"}
    assert {"q1", "q2"} <= set(pipelines)
    for name in ("q1", "q2"):
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipelines[name]]
        assert [r.data.tags["sstl.stage"] for r in stages] == ["evaluate"]
        assert stages[0].info.status == "FINISHED"
        assert (project / stages[0].info.artifact_uri / "summary.md").is_file()  # artifacts in the project


def experiments(table: object) -> dict[str, dict]:
    """`dvc exp show --json` -> {name or rev: {"params": ..., "metrics": ...}} for every row with data."""
    rows: dict[str, dict] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data:
                key = data.get("name") or node.get("name") or data.get("rev") or node.get("rev")
                rows[key] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {}),
                }
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(table)
    return rows


def test_exp_run_and_show_compare_experiments(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sstl.cli.app import app

    # a finetune param: the experiment re-runs the last two stages only (a teacher param would re-run six)
    out = dvc(project, "exp", "run", "-S", "finetune.lr=0.00031", "--name", "lowdrop")
    assert ran_stages(out) == {"finetune", "evaluate"}
    rows = experiments(json.loads(dvc(project, "exp", "show", "--json")))
    assert rows["lowdrop"]["params"]["finetune"]["lr"] == 0.00031
    baseline = [r for r in rows.values() if r["params"]["finetune"]["lr"] != 0.00031]
    assert baseline, "the baseline commit is listed beside the experiment"
    for row in [rows["lowdrop"], *baseline]:
        assert set(row["metrics"]) == set(MODELS) | set(PROBES)
        assert 0.0 <= row["metrics"]["finetuned"]["test-add"]["accuracy"] <= 1.0
    monkeypatch.chdir(project)
    res = CliRunner().invoke(app, ["exp", "show"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 120, res.stdout
    assert "lr" in lines[1] and "finetuned" in lines[0] and "t-add" in lines[1]
    lowdrop = next(line for line in lines if line.startswith("lowdrop "))
    acc = rows["lowdrop"]["metrics"]["finetuned"]["test-add"]["accuracy"]
    assert "0.00031" in lowdrop.split() and lowdrop.split()[-1] == f"{acc:.4f}"
    table = CliRunner().invoke(app, ["exp", "show", "--md"]).stdout
    assert "| finetune.lr |" in table and "| finetuned test-add |" in table and "| lowdrop |" in table


def test_report_diffs_against_a_revision(project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sstl.cli.app import app

    monkeypatch.chdir(project)
    res = CliRunner().invoke(app, ["report", "--rev", "HEAD~1", "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    rows = [
        line.split("|")[1:3] for line in res.stdout.splitlines() if line.startswith(tuple(f"| {m} |" for m in MODELS))
    ]
    assert [(m.strip(), s.strip()) for m, s in rows] == [(m, s) for m in MODELS for s in ("test", "test-add")]
    assert "| `student.dropout` | 0.2 | 0.3 |" in res.stdout  # the param the last commit changed
    assert "## sstl: `HEAD~1` → this branch" in res.stdout
    for name in ("validation-accuracy-per-epoch", "tune-convergence-teacher-validation-loss", "confusion-matrices"):
        assert (tmp_path / f"plots/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_push_clone_pull_is_clean(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "remote")
    dvc(project, "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status")
    assert ran_stages(dvc(clone, "repro")) == set()  # re-run from scratch, the same bytes: the fresh clone's test


def test_bf16_experiments_rerun_the_stages_of_their_precision(project: Path) -> None:
    # what DVC would re-run for bf16 inference (and student, finetune if a pseudo-label changed), and for
    # bf16 training (every training stage); the stages read the precision from params (test_model_card
    # checks that a checkpoint records the one it trained in)
    params = project / "params.yaml"
    original = params.read_text()

    def changed_by(key: str) -> set[str]:
        raw = yaml.safe_load(original)
        raw["precision"][key] = "bf16"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            return {line.rstrip(":").strip() for line in dvc(project, "status").splitlines() if line.endswith(":")}
        finally:
            params.write_text(original)

    infer = changed_by("infer")
    assert {"probe", "pseudolabel@0", "evaluate"} <= infer, infer
    assert not {"demo", "prepare", "pretrain", "tune", "teacher", "student@0", "finetune"} & infer, infer
    train = changed_by("train")
    assert {"pretrain", "tune", "teacher", "student@0", "finetune"} <= train, train
    assert not {"demo", "prepare", "probe"} & train, train
    assert "up to date" in dvc(project, "status")


def test_mlflow_has_one_run_per_stage_grouped_per_execution(project: Path) -> None:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["sstl"], output_format="list")
    stages = [r for r in runs if r.data.tags.get("sstl.kind") == "stage"]
    first = {
        r.data.tags["sstl.stage"]
        for r in stages
        if r.data.tags.get("sstl.pipeline") == stages[-1].data.tags["sstl.pipeline"]
    }
    assert first == {"prepare", "tune", "probe", "teacher", "pseudolabel", "student", "finetune", "evaluate"}
    parents = {r.info.run_id for r in runs if r.data.tags.get("sstl.kind") == "pipeline"}
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in stages)
    assert any(r.data.tags.get("dvc_experiment") == "lowdrop" for r in stages)
    tune = next(r for r in stages if r.data.tags["sstl.stage"] == "tune")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id]
    assert len(trials) == 3
    assert not [r for r in runs if r.info.status == "RUNNING"]  # failed stages (the full disk) closed too
    # the latest student: trained after the first commit (the baseline's runs had none to record)
    student = next(r for r in stages if r.data.tags["sstl.stage"] == "student" and r.info.status == "FINISHED")
    assert student.data.tags["git_commit"] != "unknown"
    history = mlflow.MlflowClient().get_metric_history(student.info.run_id, "val_loss")
    assert len(history) >= 2
    assert len(student.data.tags["checkpoint_sha256"]) == 64  # the model itself lives in DVC, stored once
    names = {r.info.run_name for r in runs if r.data.tags.get("sstl.kind") == "pipeline"}
    assert "lowdrop" in names and any(n.startswith("workspace@") for n in names)


def test_every_evaluate_registers_a_version_and_the_champion_is_the_best_on_test(project: Path) -> None:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    evaluates = [
        r
        for r in mlflow.search_runs(experiment_names=["sstl"], output_format="list")
        if r.data.tags.get("sstl.stage") == "evaluate" and r.info.status == "FINISHED"
    ]
    versions = client.search_model_versions("name = 'sstl'")
    assert len(versions) == len(evaluates) >= 3  # baseline, experiments, re-runs
    assert sorted(int(r.data.tags["sstl.model_version"]) for r in evaluates) == sorted(int(v.version) for v in versions)
    champion = client.get_model_version_by_alias("sstl", "champion")
    test = {str(v.version): float(v.tags["test_accuracy"]) for v in versions}
    promoted = [str(v.version) for v in versions if v.tags["champion"] == "promoted"]
    assert str(champion.version) == max(promoted, key=int)  # the alias is the last winner ...
    assert test[str(champion.version)] == max(test[v] for v in promoted)  # ... and each win raised test


def test_a_second_round_runs_only_its_own_stages_and_every_round_is_evaluated(project: Path) -> None:
    rounds = "rounds=[{teacher:teacher,student:student},{teacher:student,student:student2}]"
    ran = ran_stages(dvc(project, "exp", "run", "-S", rounds, "--name", "two-rounds"))
    assert ran == {"pseudolabel@1", "student@1", "finetune", "evaluate"}  # round 1 comes from the cache
    order = ["teacher", "student", "student2", "finetuned"]
    assert list(json.loads((project / "reports/metrics.json").read_text())) == [*PROBES, *order]  # baseline first
    assert list(json.loads((project / "reports/health.json").read_text())["val_accuracy"]) == order
    rows = (project / "data/pseudolabels/student.csv").read_text().splitlines()[1:]
    probs = np.load(project / "data/pseudolabels/student.npy")
    assert probs.shape == (len(rows), 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert rows != (project / "data/pseudolabels/teacher.csv").read_text().splitlines()[1:]  # the student's own
    second = torch.load(project / "models/student2.pt", map_location="cpu", weights_only=True)
    assert second["config"]["teacher"] == "student"
    finetuned = torch.load(project / "models/finetuned.pt", map_location="cpu", weights_only=True)
    assert finetuned["config"]["from"] == "models/student2.pt"
    assert "| student2 |" in (project / "reports/summary.md").read_text()
    assert "up to date" in dvc(project, "status")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["sstl"], output_format="list")
    named = {r.data.tags.get("sstl.stage"): r for r in runs if r.data.tags.get("dvc_experiment") == "two-rounds"}
    assert {"pseudolabel@1", "student@1", "finetune", "evaluate"} <= set(named)
    assert named["pseudolabel@1"].data.params["teacher"] == "student"
