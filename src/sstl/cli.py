"""`sstl`: a thin command line over the DVC pipeline, the MLflow store and the trained models.

Logic lives in the library; each command parses options, calls it, and turns an SstlError into
one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from sstl.errors import SstlError

app = typer.Typer(
    help="Semi-supervised transfer learning: run the pipeline, compare experiments, predict, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
exp_app = typer.Typer(help="DVC experiments: run with -S overrides, compare in a table.", no_args_is_help=True)
app.add_typer(exp_app, name="exp")

PARAMS = Path("params.yaml")
METRICS = Path("reports/metrics.json")


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except SstlError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=err.exit_code) from None


def _env() -> dict[str, str]:
    """DVC stages call `python`: put this interpreter's folder first so they use this environment."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _dvc(*args: str, env: dict[str, str] | None = None) -> int:
    if not Path("dvc.yaml").is_file():
        raise SstlError("dvc.yaml not found: run sstl from the project root")
    return subprocess.run([sys.executable, "-m", "dvc", *args], env=env or _env()).returncode


def _check_params(overrides: Sequence[str] = ()) -> None:
    """Validate params.yaml with `key=value` overrides applied, before DVC writes anything."""
    from sstl.params import load_params, parse_params

    if not overrides:
        load_params(PARAMS)
        return
    raw: dict[str, Any] = yaml.safe_load(PARAMS.read_text()) if PARAMS.is_file() else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SstlError(f"override {item!r} is not key=value (e.g. -S teacher.lr=0.003)")
        if ":" in key:  # another params file: DVC checks it
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SstlError(f"override {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    parse_params(raw, f"params.yaml with {' '.join(overrides)}")


def _exit(code: int) -> None:
    if code != 0:
        raise typer.Exit(code=code)


@app.command()
def run(
    stage: Annotated[str | None, typer.Argument(help="run up to this stage only (default: all)")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="re-run even if nothing changed")] = False,
    dry: Annotated[bool, typer.Option("--dry", help="print what would run, run nothing")] = False,
) -> None:
    """Run the pipeline (`dvc repro`): only the stages whose inputs changed."""
    with user_errors():
        _check_params()
        env = _env() | {"SSTL_PIPELINE_ID": uuid.uuid4().hex[:12]}
        args = ["repro", *([stage] if stage else []), *(["--force"] if force else []), *(["--dry"] if dry else [])]
        _exit(_dvc(*args, env=env))


@app.command()
def profile(
    name: Annotated[str, typer.Argument(help="profile to apply: photos")],
    *,
    folder: Annotated[Path | None, typer.Option(help="your image folder (labeled/, unlabeled/, test/, ...)")] = None,
) -> None:
    """Merge a params profile into params.yaml (e.g. `photos`: ImageNet EfficientNet-Lite teacher and student)."""
    from sstl.files import write_text
    from sstl.params import apply_profile

    with user_errors():
        if not PARAMS.is_file():
            raise SstlError(f"{PARAMS} not found: run sstl from the project root")
        if folder is not None and not folder.is_dir():
            raise SstlError(f"folder {folder} not found: pass the folder that holds labeled/ and unlabeled/")
        raw = yaml.safe_load(PARAMS.read_text(encoding="utf-8")) or {}
        merged = apply_profile(raw, name, None if folder is None else str(folder))
        write_text(PARAMS, yaml.safe_dump(merged, sort_keys=False))
        typer.echo(f"params.yaml: profile {name} applied; review it with `git diff params.yaml`, then `sstl run`")


@exp_app.command("run")
def exp_run(
    set_param: Annotated[
        list[str] | None, typer.Option("--set-param", "-S", help="override, e.g. -S student.epochs=20")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="experiment name")] = None,
) -> None:
    """Run the pipeline as a DVC experiment with params overridden (`dvc exp run -S ...`)."""
    overrides = set_param or []
    with user_errors():
        _check_params(overrides)
        args = ["exp", "run", *[a for o in overrides for a in ("-S", o)], *(["--name", name] if name else [])]
        _exit(_dvc(*args, env=_env() | {"SSTL_PIPELINE_ID": uuid.uuid4().hex[:12]}))


@exp_app.command("show")
def exp_show(
    markdown: Annotated[bool, typer.Option("--md", help="markdown table")] = False,
    all_columns: Annotated[bool, typer.Option("--all", help="every column, not only what differs")] = False,
) -> None:
    """Compare experiments: params and test / test-add metrics per experiment (`dvc exp show`)."""
    with user_errors():
        args = [
            "exp",
            "show",
            "--no-pager",
            *(["--md"] if markdown else []),
            *([] if all_columns else ["--only-changed"]),
        ]
        _exit(_dvc(*args))


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[Path, typer.Option(help="checkpoint to use")] = Path("models/finetuned.pt"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="classes per image")] = 3,
    fmt: Annotated[Format, typer.Option("--format", help="table, csv or json")] = Format.table,
) -> None:
    """Classify images with the fine-tuned student: top-k classes with probabilities."""
    from sstl.models import load_checkpoint
    from sstl.predict import collect_images, render
    from sstl.predict import predict as run_predict

    with user_errors():
        net, meta = load_checkpoint(model)
        images = collect_images(paths)
        rows = run_predict(
            net, meta["classes"], meta["image_size"], images, top_k, interpolation=meta.get("interpolation")
        )
        typer.echo(render(rows, fmt.value))


@app.command()
def report(
    rev: Annotated[str | None, typer.Option(help="git revision to diff against, e.g. main or HEAD~1")] = None,
) -> None:
    """Markdown for a pull request: the metrics table and, with --rev, what changed since that revision."""
    from sstl.files import read_json
    from sstl.report import diff_markdown, summary_markdown

    with user_errors():
        if not METRICS.is_file():
            raise SstlError(f"{METRICS} not found: run the pipeline first (`sstl run`)")
        text = "## sstl metrics\n\n" + summary_markdown(read_json(METRICS))
        if rev:
            text += "\n" + diff_markdown(rev)
        typer.echo(text)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="port to serve on")] = 5000,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on this project's store: one run per stage, grouped per pipeline execution."""
    from sstl.tracking import tracking_uri

    uri = tracking_uri()
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl+C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    _exit(subprocess.run(cmd).returncode)


@app.command()
def status() -> None:
    """What is out of date (`dvc status`) and the latest metrics."""
    from sstl.files import read_json
    from sstl.report import summary_markdown

    with user_errors():
        code = _dvc("status")
        if METRICS.is_file():
            typer.echo("\nlatest metrics (reports/metrics.json):\n" + summary_markdown(read_json(METRICS)))
        _exit(code)


@app.command()
def check(params: Annotated[Path, typer.Option(help="params file")] = PARAMS) -> None:
    """Validate a params file: every key known, typed and in range."""
    from sstl.params import load_params

    with user_errors():
        load_params(params)
        typer.echo(f"{params}: ok")


if __name__ == "__main__":
    app()
