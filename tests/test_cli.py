"""The `sstl` command line through Typer's CliRunner (and `sstl ui` as a real process)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, ROOT
from PIL import Image
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.config.model import ModelConfig
from sstl.models.checkpoint import save_checkpoint
from sstl.models.factory import create_model

runner = CliRunner()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "b.jpg", "nested/c.webp"]):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_table_csv_json(checkpoint: Path, images: Path) -> None:
    res = runner.invoke(app, ["predict", str(images), "--model", str(checkpoint), "--top-k", "2", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "c.webp"]  # folders expand, .txt ignored
    for r in rows:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert {p["class"] for p in r["predictions"]} <= set(CLASSES)

    res = runner.invoke(app, ["predict", str(images / "a.png"), "--model", str(checkpoint), "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert res.exit_code == 0 and [r["rank"] for r in table] == ["1", "2", "3"]

    res = runner.invoke(app, ["predict", str(images / "a.png"), "--model", str(checkpoint)])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].split() == ["path", "top1", "top2", "top3"]


def test_predict_user_mistakes_are_one_line(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for args in (
        ["predict", str(bad), "--model", str(checkpoint)],
        ["predict", str(tmp_path / "missing.png"), "--model", str(checkpoint)],
        ["predict", str(images), "--model", str(tmp_path / "none.pt")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 1
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
        assert "Traceback" not in res.output


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_and_invalid_params_write_nothing(project_copy: Path) -> None:
    assert runner.invoke(app, ["check"]).exit_code == 0
    before = sorted(p.name for p in project_copy.iterdir())
    for args, key in (
        (["exp", "run", "-S", "teacher.lrr=0.1"], "teacher.lrr"),
        (["exp", "run", "-S", "student.dropout=2"], "student.dropout"),
        (["exp", "run", "-S", "seed=abc"], "seed"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert key in res.stderr and len(res.stderr.strip().splitlines()) == 1
    text = (project_copy / "params.yaml").read_text().replace("batch_size: 64", "batch_sise: 64", 1)
    (project_copy / "params.yaml").write_text(text)
    res = runner.invoke(app, ["run"])
    assert res.exit_code == 2 and "student.batch_sise: unknown key" in res.stderr
    assert sorted(p.name for p in project_copy.iterdir()) == before  # no dvc.lock, no outputs


def test_report_reads_metrics(project_copy: Path) -> None:
    res = runner.invoke(app, ["report"])
    assert res.exit_code == 1 and "run the pipeline first" in res.stderr
    metrics = {m: {"test": {"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1}} for m in ("teacher", "finetuned")}
    (project_copy / "reports").mkdir()
    (project_copy / "reports/metrics.json").write_text(json.dumps(metrics))
    res = runner.invoke(app, ["report"])
    assert res.exit_code == 0
    assert "| teacher | 0.5000 | 0.4000 | 0.1000 |" in res.stdout


def test_help_on_every_command() -> None:
    commands = (["run"], ["exp", "run"], ["exp", "show"], ["predict"], ["report"], ["ui"], ["serve"], ["status"])
    for cmd in (*commands, ["check"], ["label-queue"], ["label-import"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.stdout


def test_profile_merges_into_params_and_refuses_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_text()
    res = runner.invoke(app, ["profile", "fotos"])
    assert res.exit_code == 1 and "unknown profile 'fotos': choose one of photos" in res.output
    res = runner.invoke(app, ["profile", "photos", "--folder", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "folder" in res.output and "not found" in res.output
    assert (tmp_path / "params.yaml").read_text() == before, "nothing written on bad input"
    (tmp_path / "pics").mkdir()
    res = runner.invoke(app, ["profile", "photos", "--folder", str(tmp_path / "pics")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["check"])
    assert res.exit_code == 0, res.output
    import yaml

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["data"]["folder"] == str(tmp_path / "pics")
    assert (params["teacher"]["arch"], params["student"]["arch"]) == ("tf_efficientnet_lite0", "tf_efficientnet_lite2")


def test_predict_reads_with_the_checkpoints_own_preprocessing(tmp_path: Path, images: Path) -> None:
    """A lite model normalises with 0.5/0.5 and packs bicubic: predict must give what the model gives
    on the same pixels prepared that way, not on ImageNet-normalised ones."""
    import torch

    from sstl.data.images import decode

    cfg = ModelConfig(arch="tf_efficientnet_lite0", head_layers=0)
    torch.manual_seed(0)
    model = create_model(cfg, len(CLASSES)).eval()
    path = tmp_path / "lite.pt"
    save_checkpoint(path, model, cfg, CLASSES, image_size=32, interpolation="bilinear")
    res = runner.invoke(app, ["predict", str(images / "a.png"), "--model", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    got = {p["class"]: p["probability"] for p in json.loads(res.stdout)[0]["predictions"]}
    pixels = torch.from_numpy(decode((images / "a.png").read_bytes(), 32, "bilinear").copy())[None]
    with torch.no_grad():
        probs = model(model.preprocess(pixels)).softmax(1)[0]
    want = {c: round(float(p), 4) for c, p in zip(CLASSES, probs, strict=True)}
    assert got == {c: want[c] for c in got}


def test_predict_skips_an_unreadable_photo_with_one_line_and_goes_on(checkpoint: Path, images: Path) -> None:
    import threading

    (images / "broken.jpg").symlink_to(images / "deleted.jpg")
    (images / "nested" / "garbage.png").write_bytes(b"not a png at all")
    os.mkfifo(images / "pipe.png")
    (images / ".DS_Store").write_bytes(b"litter")
    (images / "__MACOSX").mkdir()
    (images / "__MACOSX" / "._a.png").write_bytes(b"AppleDouble, not an image")
    box: dict = {}  # the CliRunner result, from the worker thread
    args = ["predict", str(images), "--model", str(checkpoint), "--format", "json"]
    worker = threading.Thread(target=lambda: box.update(res=runner.invoke(app, args)), daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():  # release a reader stuck on the FIFO, then fail
        os.close(os.open(images / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("predict blocked on a FIFO")
    res = box["res"]
    assert res.exit_code == 0, res.output
    assert [Path(r["path"]).name for r in json.loads(res.stdout)] == ["a.png", "b.jpg", "c.webp"]
    lines = res.stderr.strip().splitlines()
    skipped = {line.split(": ", 1)[0].removeprefix("skipped "): line.split(": ", 1)[1] for line in lines}
    assert skipped == {
        str(images / "broken.jpg"): "broken symbolic link (its target is missing)",
        str(
            images / "nested" / "garbage.png"
        ): "not a readable image (UnidentifiedImageError: cannot identify image file)",
        str(images / "pipe.png"): "not a regular file (a FIFO (named pipe))",
    }
    assert "0x" not in res.stderr and "object at" not in res.stderr


def test_predict_error_names_the_file_without_object_addresses(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"plain text, not a jpeg")
    res = runner.invoke(app, ["predict", str(bad), "--model", str(checkpoint)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {bad}: not a readable image") and len(res.stderr.strip().splitlines()) == 1
    assert "0x" not in res.stderr and "object at" not in res.stderr
    other = tmp_path / "link.png"
    other.symlink_to(tmp_path / "missing.png")
    res = runner.invoke(app, ["predict", str(bad), str(other), "--model", str(checkpoint)])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error: none of the 2 images could be read, e.g. ")


def test_predict_tta_flag_changes_scores_and_rejects_unknown(checkpoint: Path, images: Path) -> None:
    def probs(*extra: str) -> list[float]:
        res = runner.invoke(
            app, ["predict", str(images / "a.png"), "--model", str(checkpoint), "--format", "json", *extra]
        )
        assert res.exit_code == 0, res.output
        return [p["probability"] for p in json.loads(res.stdout)[0]["predictions"]]

    assert probs("--tta", "none") == probs()  # no params.yaml here: none
    assert len(probs("--tta", "flip_translate")) == 3  # (that TTA changes logits: tests/test_inference.py)
    res = runner.invoke(app, ["predict", str(images / "a.png"), "--model", str(checkpoint), "--tta", "rotate"])
    assert res.exit_code == 2 and "rotate" in res.output
