"""What a DVC user trusts: one MLflow store per project (parallel, temp, moved), killed runs closed,
an unreadable dvc.lock or params.yaml explained in one line, a full or read-only disk caught early,
servers on loopback that stop with the CLI."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import ROOT
from dvc.repo import Repo
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.core.errors import SstlError
from sstl.core.files import check_writable, write_text
from sstl.track import tracking


@pytest.fixture
def project_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default store of a project at tmp_path/project, entered from elsewhere (as DVC's temp runs do)."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    yield root
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))


def test_runs_and_artifacts_land_in_the_project_store_with_a_relative_location(project_store: Path) -> None:
    report = Path("report.txt")
    report.write_text("figures")
    with tracking.stage_run("evaluate", "sstl", {"a": 1}) as run_id:
        tracking.log_artifacts(report)
    assert (project_store / "mlflow.db").is_file()
    run = MlflowClient().get_run(run_id)
    assert (project_store / run.info.artifact_uri / "report.txt").read_text() == "figures"
    with sqlite3.connect(project_store / "mlflow.db") as con:
        (location,) = con.execute("SELECT artifact_location FROM experiments WHERE name = 'sstl'").fetchone()
    assert location == "mlartifacts"  # moves with the project
    assert run.data.tags["env.torch"] and run.data.tags["sstl.pid"] == str(os.getpid())


def test_processes_creating_the_store_at_once_all_succeed(project_store: Path) -> None:
    code = "from sstl.track import tracking; print(tracking._experiment_id('sstl'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert len(set(outs)) == 1  # one experiment, not four


def test_a_run_left_running_by_a_killed_process_is_closed_and_linked(project_store: Path) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tracking._experiment_id("sstl")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sstl").experiment_id
    tags = {"sstl.stage": "teacher", "sstl.host": socket.gethostname(), "sstl.pid": str(victim.pid)}
    stale = client.create_run(experiment, tags=tags).info.run_id
    live = client.create_run(experiment, tags=tags | {"sstl.pid": str(os.getpid())}).info.run_id
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with tracking.stage_run("teacher", "sstl", {}) as run_id:
        pass
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"  # a live process (a parallel experiment) is left alone
    assert client.get_run(run_id).data.tags["sstl.resumes"] == stale


def _git_project(tmp_path: Path, lock_text: str) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "dvc.lock"], check=True)
    (tmp_path / "dvc.lock").write_text(lock_text)
    return tmp_path


@pytest.mark.parametrize("lock_text", ["", "schema: '2.0'\nstages:\n  teacher:\n    cmd: [unclosed\n"])
def test_an_empty_or_torn_dvc_lock_names_the_command_that_restores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock_text: str
) -> None:
    monkeypatch.chdir(_git_project(tmp_path, lock_text))
    for command in (["run"], ["status"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            "error: dvc.lock is empty or unreadable (a run was killed while DVC wrote it): "
            "restore it with `git checkout -- dvc.lock`"
        ]


def test_a_broken_params_yaml_names_the_line_at_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 1\nteacher:\n  lr 0.01\n  epochs: 3\n")
    result = CliRunner().invoke(app, ["exp", "run", "-S", "teacher.epochs=4"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: params.yaml: not valid YAML at line 3 (`lr 0.01`): mapping values are not allowed here: fix the syntax"
    )


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount instead
        _mount(tmp_path / "models", "ro")
    else:
        (tmp_path / "models").mkdir()
        (tmp_path / "models").chmod(0o500)
    try:
        with pytest.raises(SstlError, match=r"cannot write to .*models/: (read-only file system|permission denied)"):
            check_writable(tmp_path / "models/teacher.pt")
    finally:
        _umount(tmp_path / "models")


def test_every_stage_names_its_outputs_in_its_command_as_dvc_resolves_it(tmp_path: Path) -> None:
    # paths are written once, in dvc.yaml: a stage script checks (and writes) what its argv names, so
    # every output DVC tracks must be in the command DVC runs, a later round's too
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    rounds = [{"teacher": "teacher", "student": "student"}, {"teacher": "student", "student": "student2"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rounds": rounds}))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
    assert set(stages) >= {"teacher", "pseudolabel@1", "student@1", "finetune", "evaluate"}
    for name, stage in stages.items():
        words = stage.cmd.split()
        for out in stage.outs:
            assert out.def_path in words, f"{name}: {out.def_path} is not in its cmd {stage.cmd!r}"
    assert "models/student2.pt" in stages["student@1"].cmd.split()
    assert "data/pseudolabels/student.npy" in stages["pseudolabel@1"].cmd.split()
    assert "models/student2.pt" in stages["finetune"].cmd.split()  # the last round's student is fine-tuned


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    _mount(folder, "size=64k")
    try:
        with pytest.raises(SstlError, match=r"needed: free some space"):
            check_writable(folder / "teacher.pt", need_mb=1)
        with pytest.raises(SstlError, match=r"cannot write .*teacher.pt: no space left in .*models/"):
            write_text(folder / "teacher.pt", "x" * 200_000)
        assert list(folder.iterdir()) == []
    finally:
        _umount(folder)


def _mount(folder: Path, options: str) -> None:
    folder.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root in the sandbox) to make a real full/read-only disk: {res.stderr!r}")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                found.add(local.split(":")[0])
    return found


def test_sstl_ui_serves_the_store_on_loopback_and_stopping_it_stops_its_workers(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cli = subprocess.Popen([sys.executable, "-m", "sstl.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and cli.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        assert _listening(port) == {"0100007F"}  # 127.0.0.1 only
        group = os.getpgid(_children(cli.pid)[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.read().decode().strip() == "OK"  # MLflow's own server, on this store
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # no worker left behind
        assert _listening(port) == set()
    finally:
        if cli.poll() is None:
            cli.kill()


@pytest.mark.parametrize("command", ["ui", "serve"])
def test_a_taken_port_is_one_line_and_a_failure(tmp_path: Path, command: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (tmp_path / "params.yaml").write_text("mlflow: {model_name: sstl}\n")
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        res = subprocess.run(
            [sys.executable, "-m", "sstl.cli", command, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use: stop what holds it, or pass --port"
    ]
    assert "http://" not in res.stdout  # no URL promised for a server that never started


def test_a_port_whose_server_just_stopped_is_free_to_serve_again() -> None:
    # a stopped server's own side of a connection it closed lingers in TIME_WAIT for a minute; the
    # next `sstl ui` on that port must start (its server binds with SO_REUSEADDR), not say "in use"
    from sstl.cli.servers import check_port
    from sstl.core.errors import SstlError

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(SstlError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)  # listening: taken
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server closes first: its side goes to TIME_WAIT
            client.recv(1)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the lingering connection is there
    check_port("127.0.0.1", port)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_write_errors_cover_the_disk_kinds() -> None:
    from sstl.core.files import WRITE_ERRORS

    assert {errno.ENOSPC, errno.EACCES, errno.EROFS} <= set(WRITE_ERRORS)
    assert shutil.disk_usage(".").free > 0
