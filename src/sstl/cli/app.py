"""`sstl`: a thin command line over the DVC pipeline, the MLflow store and the trained models.

Logic lives in the library; each command parses options, calls it, and turns an SstlError into
one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sstl.cli.dvc import PARAMS, before_dvc, dvc, dvc_env, status_check
from sstl.cli.servers import check_port, run_server
from sstl.core.errors import SstlError
from sstl.runtime.device import CPU

if TYPE_CHECKING:
    from sstl.config.runtime import Tta
    from sstl.track.registry import ImageClassifier


app = typer.Typer(
    help="Semi-supervised transfer learning: run the pipeline, compare experiments, predict, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


exp_app = typer.Typer(help="DVC experiments: run with -S overrides, compare in a table.", no_args_is_help=True)
app.add_typer(exp_app, name="exp")

METRICS = Path("reports/metrics.json")
HEALTH = Path("reports/health.json")  # evaluate's verdict: the model to use
ENVIRONMENT = Path("reports/environment.json")  # not a DVC output: host-dependent


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except SstlError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=err.exit_code) from None


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
        before_dvc()
        env = dvc_env() | {"SSTL_PIPELINE_ID": uuid.uuid4().hex[:12]}
        args = ["repro", *([stage] if stage else []), *(["--force"] if force else []), *(["--dry"] if dry else [])]
        code = dvc(*args, env=env)
        if code == 0 and not dry:
            from sstl.core.environment import write_report

            write_report(ENVIRONMENT)  # what the figures were made with: versions, CPU, lock digest
            if stage is None:
                _register_committed(env["SSTL_PIPELINE_ID"])
        _exit(code)


def _register_committed(pipeline: str) -> None:
    """A store without a champion (a fresh clone, whose evaluate DVC skipped) gets the committed model to use."""
    from sstl.params import load_params
    from sstl.pipeline.evaluate import register_committed

    os.environ["SSTL_PIPELINE_ID"] = pipeline  # the registration run joins this execution's runs
    said = register_committed(load_params(PARAMS), prepared=Path("data/prepared"), health=HEALTH, metrics=METRICS)
    if said:
        typer.echo(said)


@app.command()
def profile(
    name: Annotated[str, typer.Argument(help="profile to apply: photos")],
    *,
    folder: Annotated[Path | None, typer.Option(help="your image folder (labeled/, unlabeled/, test/, ...)")] = None,
) -> None:
    """Merge a params profile into params.yaml (e.g. `photos`: ImageNet EfficientNet-Lite teacher and student)."""
    from sstl.params import write_profile

    with user_errors():
        if not PARAMS.is_file():
            raise SstlError(f"{PARAMS} not found: run sstl from the project root")
        if folder is not None and not folder.is_dir():
            raise SstlError(f"folder {folder} not found: pass the folder that holds labeled/ and unlabeled/")
        write_profile(PARAMS, name, None if folder is None else str(folder))
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
        before_dvc(overrides)
        args = ["exp", "run", *[a for o in overrides for a in ("-S", o)], *(["--name", name] if name else [])]
        _exit(dvc(*args, env=dvc_env() | {"SSTL_PIPELINE_ID": uuid.uuid4().hex[:12]}))


@exp_app.command("show")
def exp_show(
    markdown: Annotated[bool, typer.Option("--md", help="markdown table, every changed param")] = False,
    full: Annotated[
        bool, typer.Option("--full", help="DVC's own table: every param, metric and dependency hash")
    ] = False,
    width: Annotated[int, typer.Option(min=60, help="columns the table may take")] = 120,
) -> None:
    """Compare experiments: the params that differ and test / test-add accuracy per model, in `width` columns."""
    from sstl.review.dvc import dvc_json
    from sstl.review.experiments import exp_markdown, exp_table, experiments

    with user_errors():
        if full:
            _exit(dvc("exp", "show", "--no-pager", *(["--md"] if markdown else [])))
            return
        if not Path("dvc.yaml").is_file():
            raise SstlError("dvc.yaml not found: run sstl from the project root")
        rows = experiments(dvc_json(["exp", "show"]))
        typer.echo(exp_markdown(rows) if markdown else exp_table(rows, width=width), nl=False)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class Strategy(str, Enum):
    margin = "margin"
    entropy = "entropy"
    diverse = "diverse"


class TtaMode(str, Enum):
    none = "none"
    flip = "flip"
    flip_translate = "flip_translate"


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[
        str | None,
        typer.Option(
            help="checkpoint file, or a registered model: models:/sstl@champion, models:/sstl/3 "
            "(default: the model to use, as evaluate chose it in reports/health.json)"
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="classes per image")] = 3,
    fmt: Annotated[Format, typer.Option("--format", help="table, csv or json")] = Format.table,
    tta: Annotated[
        TtaMode | None,
        typer.Option(help="test-time augmentation (default: the registered model's, else params.yaml's evaluate.tta)"),
    ] = None,
) -> None:
    """Classify images with the model to use (or a registered model): top-k classes with probabilities."""
    from sstl.eval.predict import collect_images, render
    from sstl.eval.predict import predict as run_predict

    with user_errors():
        model = model or str(_model_to_use())
        classifier = _classifier(model)
        if tta is not None:
            classifier.tta = tta.value
        elif not _is_uri(model):
            classifier.tta = _params_tta()
        images = collect_images(paths)
        rows = run_predict(
            classifier.model,
            classifier.classes,
            classifier.image_size,
            images,
            top_k,
            interpolation=classifier.interpolation,
            tta=classifier.tta,
            runtime=CPU,
        )
        typer.echo(render(rows, fmt.value))


def _model_to_use() -> Path:
    from sstl.eval.health import model_to_use

    return model_to_use(HEALTH)


def _params_tta() -> Tta:
    """params.yaml's evaluate.tta: what evaluate scored with, the default of predict and label-queue."""
    from sstl.params import load_params

    return load_params(PARAMS).evaluate.tta if PARAMS.is_file() else "none"


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def _classifier(model: str) -> ImageClassifier:
    """A checkpoint path or an MLflow model URI (models:/..., runs:/...) -> the loaded classifier."""
    from sstl.track.registry import ImageClassifier, load

    if _is_uri(model):
        return load(model)
    classifier = ImageClassifier()
    classifier.load(Path(model))
    return classifier


@app.command()
def report(
    rev: Annotated[str | None, typer.Option(help="git revision to compare with, e.g. main or HEAD~1")] = None,
    plots: Annotated[
        Path | None, typer.Option(help="with --rev: draw the DVC plots, old vs new, as PNG files in this folder")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write the markdown to this file instead of stdout")
    ] = None,
) -> None:
    """Markdown for a pull request: with --rev, accuracy / macro-F1 / ECE per model and split against that
    revision, the params that changed and (--plots) the plots; without, the metrics table."""
    from sstl.core.files import read_json, write_text
    from sstl.eval.report import summary_markdown
    from sstl.review.diff import review_markdown

    with user_errors():
        if plots is not None and not rev:
            raise SstlError("--plots compares two revisions: add --rev, e.g. --rev main")
        if rev:
            if not Path("dvc.yaml").is_file():
                raise SstlError("dvc.yaml not found: run sstl from the project root")
            text = review_markdown(rev, plots=plots, relative_to=None if output is None else output.parent)
        elif not METRICS.is_file():
            raise SstlError(f"{METRICS} not found: run the pipeline first (`sstl run`)")
        else:
            text = "## sstl metrics\n\n" + summary_markdown(read_json(METRICS))
        if output is None:
            typer.echo(text, nl=False)
        else:
            write_text(output, text)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="port to serve on")] = 5000,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on this project's store: one run per stage, grouped per pipeline execution."""
    from sstl.track.tracking import tracking_uri

    with user_errors():
        check_port(host, port)
        uri = tracking_uri()
        typer.echo(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl+C to stop)")
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
        _exit(run_server(cmd))


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="model URI (default: models:/<mlflow.model_name>@champion)")] = None,
    port: Annotated[int, typer.Option(help="port to serve on")] = 5001,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Serve the champion model over HTTP: POST /invocations with base64 images (MLflow's protocol).

    Example: {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"]]}} -> class,
    probability and the probability of every class per image. Limits: params.yaml's serve section."""
    from sstl.config.serve import ServeConfig
    from sstl.params import load_params
    from sstl.track.registry import CHAMPION, champion_version
    from sstl.track.tracking import project_root, tracking_uri

    with user_errors():
        check_port(host, port)
        params = load_params(PARAMS) if PARAMS.is_file() else None
        if model is None:
            name = params.mlflow.model_name if params is not None else None
            if not name:
                raise SstlError(
                    "mlflow.model_name is not set in params.yaml: set it, or pass --model models:/<name>@<alias>"
                )
            if champion_version(name) is None:
                raise SstlError(
                    f"{name} has no champion in this project's store: run `sstl run` first (it registers one)"
                )
            model = f"models:/{name}@{CHAMPION}"
        limits = params.serve if params is not None else ServeConfig()
        typer.echo(f"serving {model} from {tracking_uri()} at http://{host}:{port}/invocations (Ctrl+C to stop)")
        cmd = [sys.executable, "-m", "sstl.track.serve", "--model", model, "--host", host, "--port", str(port)]
        cmd += ["--config", limits.model_dump_json()]
        env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri()}
        _exit(run_server(cmd, env=env, cwd=project_root()))


@app.command()
def status(
    check_only: Annotated[
        bool, typer.Option("--check", help="exit 1 unless every stage is up to date (for CI), naming what is not")
    ] = False,
) -> None:
    """What is out of date (`dvc status`) and the latest metrics."""
    from sstl.core.files import read_json
    from sstl.eval.report import summary_markdown

    with user_errors():
        if check_only:
            status_check()
            return
        before_dvc()
        code = dvc("status")
        if METRICS.is_file():
            typer.echo("\nlatest metrics (reports/metrics.json):\n" + summary_markdown(read_json(METRICS)))
        _exit(code)


@app.command()
def deps(
    check_only: Annotated[bool, typer.Option("--check", help="only report drift, exit 1 if any")] = False,
) -> None:
    """Derive each stage's code deps in dvc.yaml from what its script imports (run after adding a module)."""
    from sstl.core.codedeps import drift, write_deps

    with user_errors():
        if not Path("dvc.yaml").is_file():
            raise SstlError("dvc.yaml not found: run sstl from the project root")
        found = drift(Path("dvc.yaml"))
        for stage, (missing, extra) in found.items():
            typer.echo(f"{stage}: missing {missing or '-'}; not imported {extra or '-'}")
        if check_only:
            _exit(1 if found else 0)
            return
        changed = write_deps(Path("dvc.yaml"))
        typer.echo(
            f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: code deps up to date"
        )


def _params_folder() -> str | None:
    """params.yaml's data.folder, or None without a params.yaml (then --folder is needed)."""
    from sstl.params import load_params

    return load_params(PARAMS).data.folder if PARAMS.is_file() else None


def _photo_folder(folder: Path | None) -> Path:
    if folder is not None:
        return folder
    found = _params_folder()
    if found is None:
        raise SstlError(f"{PARAMS} not found: pass --folder, the photo folder (labeled/, unlabeled/, ...)")
    return Path(found)


@app.command("label-queue")
def label_queue(
    *,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="photos to queue")] = 200,
    strategy: Annotated[
        Strategy, typer.Option(help="margin: smallest top-2 gap | entropy | diverse: uncertain, spread over clusters")
    ] = Strategy.margin,
    model: Annotated[
        Path | None, typer.Option(help="checkpoint to score with (default: the model to use, reports/health.json)")
    ] = None,
    folder: Annotated[
        Path | None, typer.Option(help="photo folder whose unlabeled/ is scored (default: params.yaml data.folder)")
    ] = None,
    out: Annotated[Path, typer.Option(help="queue folder to write: images/ and queue.csv")] = Path("label-queue"),
    seed: Annotated[int, typer.Option(help="seed of the diverse strategy's clustering")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out folder")] = False,
    tta: Annotated[
        TtaMode | None, typer.Option(help="test-time augmentation (default: params.yaml's evaluate.tta, else none)")
    ] = None,
) -> None:
    """Queue the unlabelled photos most worth labelling next: copies and a CSV for a labelling tool."""
    from sstl.labelling.queue import label_queue as make_queue

    with user_errors():
        mode = tta.value if tta is not None else _params_tta()
        done = make_queue(
            model_path=model or _model_to_use(),
            folder=_photo_folder(folder),
            out=out,
            n=n,
            strategy=strategy.value,
            seed=seed,
            force=force,
            tta=mode,
            runtime=CPU,
        )
        skipped = f", {done.skipped} unreadable skipped" if done.skipped else ""
        typer.echo(
            f"{done.out}/queue.csv: {done.picked} of {done.pool} unlabelled photos by {strategy.value}{skipped}; "
            f"fill its label column, then `sstl label-import {done.out}/queue.csv`"
        )


@app.command("label-import")
def label_import(
    labels: Annotated[Path, typer.Argument(help="the queue CSV with its label column filled")],
    *,
    folder: Annotated[
        Path | None, typer.Option(help="photo folder the queue was made from (default: params.yaml data.folder)")
    ] = None,
    new_classes: Annotated[
        bool, typer.Option("--new-classes", help="a label that is no labeled/ folder yet starts a class")
    ] = False,
) -> None:
    """Move the labelled photos from unlabeled/ to labeled/<class>/ and record it; `sstl run` retrains."""
    from sstl.labelling.importer import import_labels, refresh_if_project

    with user_errors():
        root = _photo_folder(folder)
        project = _params_folder()  # before anything moves: a broken params.yaml stops here, not half-way
        done = import_labels(labels, folder=root, new_classes=new_classes)
        moved = sum(done.moved.values())
        per_class = ", ".join(f"{c} {k}" for c, k in sorted(done.moved.items()))
        typer.echo(f"moved {moved} photos into {root}/labeled/" + (f" ({per_class})" if per_class else ""))
        if done.unlabelled:
            typer.echo(f"{done.unlabelled} rows without a label: their photos stay in unlabeled/")
        if done.already:
            typer.echo(f"{done.already} rows already imported before: nothing to do for them")
        if moved:
            refreshed = refresh_if_project(root, project)
            note = "data/inventory.json updated; " if refreshed else ""
            typer.echo(f"recorded in {done.record}; {note}`sstl run` retrains with the new labels")


@app.command()
def check(params: Annotated[Path, typer.Option(help="params file")] = PARAMS) -> None:
    """Validate a params file: every key known, typed and in range."""
    from sstl.params import load_params

    with user_errors():
        load_params(params)
        typer.echo(f"{params}: ok")


if __name__ == "__main__":
    app()
