"""Everything MLflow, in one module: stage runs grouped per pipeline execution, metrics, artifacts
(the model registry and the served pyfunc are `sstl.track.registry`, built on this module's store).

Store: $MLFLOW_TRACKING_URI, else the SQLite file `mlflow.db` with artifacts under `mlartifacts/`
at the project root. DVC sets DVC_ROOT for every stage it runs, for queued and `--temp`
experiments to the parent project rather than its temporary copy, so every experiment, parallel
or not, logs into the project's one store (which `sstl ui` opens) and survives DVC's clean-up.
The artifact location is stored relative (`mlartifacts`), so a copied or moved project keeps
working; artifacts are written with the project root as working directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from sstl.core.provenance import code_digest, dvc_experiment, git_commit, pipeline_id
from sstl.runtime.distributed import world

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines: nothing to send home


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stage logs: figures, not download bars


STORE, ARTIFACTS_DIR = "mlflow.db", "mlartifacts"


logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def project_root() -> Path:
    """The DVC project this process works for: DVC_ROOT under DVC, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def _project_store() -> str:
    return f"sqlite:///{project_root() / STORE}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _project_store()


def _default_store() -> bool:
    # compared, not "is the variable unset": mlflow.set_tracking_uri exports the URI it is given
    return tracking_uri() == _project_store()


@contextmanager
def store_lock() -> Iterator[None]:
    """One process at a time opens the store: MLflow creates its tables on first use, and parallel
    experiments creating them at once fail (`table experiments already exists`)."""
    lock = project_root() / ".sstl-state" / "mlflow.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _at_root() -> Iterator[None]:
    """Run with the project root as working directory: relative artifact locations resolve there."""
    here = Path.cwd()
    os.chdir(project_root())
    try:
        yield
    finally:
        os.chdir(here)


def _experiment_id(name: str) -> str:
    """Make `name` the active experiment (created on first use), so nested runs land in it too."""
    with store_lock():
        mlflow.set_tracking_uri(tracking_uri())
        if mlflow.get_experiment_by_name(name) is None:
            experiment_id = mlflow.create_experiment(name)
            if _default_store():
                _relative_artifacts(project_root() / STORE, experiment_id)
        return mlflow.set_experiment(name).experiment_id


def _relative_artifacts(db: Path, experiment_id: str) -> None:
    """MLflow makes every artifact location absolute at creation; store ours as `mlartifacts`, relative
    to the project root, so the store can be copied or moved with the project (no API sets it)."""
    with sqlite3.connect(db) as con:
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (ARTIFACTS_DIR, int(experiment_id))
        )


@contextmanager
def model_store() -> Iterator[None]:
    """Read registered models from the project's store: its URI set and the project root as working
    directory (artifact locations are stored relative to it)."""
    mlflow.set_tracking_uri(tracking_uri())
    with _at_root():
        yield


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested params as MLflow param keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _process_tags() -> dict[str, str]:
    """Who writes a run: a run left RUNNING by a process that no longer exists was killed."""
    return {"sstl.host": socket.gethostname(), "sstl.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_killed_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    """Mark as KILLED the runs left RUNNING by processes of this host that are gone (kill -9, power
    loss); returns them. Runs of live processes (a parallel experiment) are left alone."""
    host, killed = socket.gethostname(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("sstl.host") != host or _alive(int(tags.get("sstl.pid", "0") or 0)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        killed.append(run)
    return killed


def _pipeline_run(client: MlflowClient, experiment_id: str, pid: str) -> str:
    """The parent run of this pipeline execution: found by tag, or created (then closed) on first use.
    Named after the DVC experiment (`dvc exp run`), else `workspace@<commit>` (MLflow shows when)."""
    query = f"tags.`sstl.pipeline` = '{pid}' and tags.`sstl.kind` = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    experiment = dvc_experiment()
    run = client.create_run(
        experiment_id,
        run_name=experiment if experiment != "workspace" else f"workspace@{git_commit()[:7]}",
        tags={
            "sstl.pipeline": pid,
            "sstl.kind": "pipeline",
            "git_commit": git_commit(),
            "dvc_experiment": experiment,
        },
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any], rank: int = 0) -> Iterator[str]:
    """An MLflow run for one stage, child of its pipeline execution's run; yields the run id.

    Runs of this stage left RUNNING by a killed process are closed as KILLED first, and the new run
    names the last of them (`sstl.resumes`). Under torchrun only rank 0 logs (`rank` > 0 yields ""
    and every log_* call below is a no-op there)."""
    if rank != 0:
        yield ""
        return
    experiment_id = _experiment_id(experiment)
    client = MlflowClient()
    killed = [r for r in close_killed_runs(client, experiment_id) if r.data.tags.get("sstl.stage") == stage]
    pid = pipeline_id()
    parent = _pipeline_run(client, experiment_id, pid)
    tags = {
        "mlflow.parentRunId": parent,
        "sstl.stage": stage,
        "sstl.pipeline": pid,
        "sstl.kind": "stage",
        "git_commit": git_commit(),
        "code_sha256": code_digest(),
        "dvc_experiment": dvc_experiment(),
        **_process_tags(),
        **environment_tags(),
    }
    if killed:
        tags["sstl.resumes"] = max(killed, key=lambda r: r.info.start_time).info.run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params(flatten(params))
        start = time.perf_counter()
        yield run.info.run_id
        # ru_maxrss is in KiB on Linux: the process's peak resident memory, imports included
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peaks = {"stage_seconds": time.perf_counter() - start, "peak_rss_mb": peak_mb}
        if torch.cuda.is_initialized():
            peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        mlflow.log_metrics(peaks)


def environment_tags() -> dict[str, str]:
    """The installed versions and the CPU, so that every figure names its environment."""
    from sstl.core.environment import describe

    return {f"env.{k}": str(v) for k, v in describe(project_root() / "requirements.lock").items()}


@contextmanager
def trial_run(trial: int, params: Mapping[str, Any]) -> Iterator[str]:
    """A run nested under the active (tune) run."""
    tags = {"sstl.kind": "trial", **_process_tags()}
    with mlflow.start_run(run_name=f"trial-{trial:02d}", nested=True, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run.info.run_id


def _lead() -> bool:
    """Whether this process logs: always, but for torchrun ranks other than 0."""
    return world()[0] == 0


def log_epoch(row: Mapping[str, float], prefix: str = "") -> None:
    """One epoch's figures as MLflow metrics at step = epoch (a curve per key in the UI)."""
    if not _lead():
        return
    step = int(row["epoch"])
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=step)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    if not _lead():
        return
    numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    mlflow.log_metrics(numeric, step=step)


def log_artifacts(*paths: Path | str) -> None:
    """Copy reports into the active run's artifacts (checkpoints stay in DVC: stored once, not thrice)."""
    if not _lead():
        return
    sources = [Path(p).resolve() for p in paths]
    with _at_root():
        for path in sources:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                mlflow.log_artifact(str(path))


def set_tags(tags: Mapping[str, Any]) -> None:
    if _lead():
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
