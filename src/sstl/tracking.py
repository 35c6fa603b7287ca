"""Everything MLflow, in one module: stage runs grouped per pipeline execution, metrics, models.

Store: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` with artifacts under `mlartifacts/`
in the working directory (the project root when run by DVC). `sstl ui` opens the same store.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from sstl.provenance import dvc_experiment, git_commit, pipeline_id
from sstl.runtime import world

DEFAULT_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines: nothing to send home
ARTIFACTS_DIR = "mlartifacts"

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _experiment_id(name: str) -> str:
    """Make `name` the active experiment (created on first use), so nested runs land in it too."""
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (Path.cwd() / ARTIFACTS_DIR).resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    return mlflow.set_experiment(name).experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested params as MLflow param keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pipeline_run(client: MlflowClient, experiment_id: str, pid: str) -> str:
    """The parent run of this pipeline execution: found by tag, or created (then closed) on first use."""
    query = f"tags.`sstl.pipeline` = '{pid}' and tags.`sstl.kind` = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{pid}",
        tags={
            "sstl.pipeline": pid,
            "sstl.kind": "pipeline",
            "git_commit": git_commit(),
            "dvc_experiment": dvc_experiment(),
        },
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any], rank: int = 0) -> Iterator[str]:
    """An MLflow run for one stage, child of its pipeline execution's run; yields the run id.

    Under torchrun only rank 0 logs (`rank` > 0 yields "" and every log_* call below is a no-op there)."""
    if rank != 0:
        yield ""
        return
    experiment_id = _experiment_id(experiment)
    pid = pipeline_id()
    parent = _pipeline_run(MlflowClient(), experiment_id, pid)
    tags = {
        "mlflow.parentRunId": parent,
        "sstl.stage": stage,
        "sstl.pipeline": pid,
        "sstl.kind": "stage",
        "git_commit": git_commit(),
        "dvc_experiment": dvc_experiment(),
    }
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


@contextmanager
def trial_run(trial: int, params: Mapping[str, Any]) -> Iterator[str]:
    """A run nested under the active (tune) run."""
    with mlflow.start_run(run_name=f"trial-{trial:02d}", nested=True, tags={"sstl.kind": "trial"}) as run:
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
    if not _lead():
        return
    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.is_file():
            mlflow.log_artifact(str(path))


def log_model(model: Any, example: np.ndarray, name: str = "model") -> None:
    """The trained torch module as an MLflow model, exported as a traced graph (pt2) from `example`,
    a float32 (N, 3, H, W) normalised batch that also gives the model its signature."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pytorch.log_model(
            model.eval(),
            name=name,
            input_example=example,
            serialization_format="pt2",
            pip_requirements=["torch", "torchvision"],
        )
