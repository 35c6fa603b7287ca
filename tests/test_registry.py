"""The registered pyfunc and the champion alias, and `sstl serve` as a real MLflow server on 127.0.0.1.

A small CNN is trained on the demo's real digit PNGs (seconds); it is published to a fresh SQLite
store like `evaluate` does, served with MLflow's own scoring server and asked over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.config.model import ModelConfig
from sstl.config.train import TrainConfig
from sstl.data.dataset import ImageSet
from sstl.data.demo import CLASSES, write_demo
from sstl.data.images import decode, read_file
from sstl.models.checkpoint import save_checkpoint
from sstl.models.factory import create_model
from sstl.runtime.device import CPU
from sstl.track import tracking
from sstl.track.registry import CHAMPION, Scores, beats, data_digest, load, publish
from sstl.train.loop import fit
from sstl.train.setup import FitSetup

SIZE = 16
NAME = "digits"


def load_folder(folder: Path) -> ImageSet:
    paths = sorted(folder.glob("*/*.png"))
    images = np.stack([decode(read_file(p), SIZE, "bilinear") for p in paths])
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    return ImageSet(torch.from_numpy(images), labels, [str(p) for p in paths])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a checkpoint trained on 60 real digit photos per class, the folder of test PNGs)."""
    root = tmp_path_factory.mktemp("digits")
    write_demo(root / "photos", labels_per_class=60, test_fraction=0.1, test_add_fraction=0.0, seed=0)
    train = load_folder(root / "photos/labeled")
    cfg = ModelConfig(arch="convnet_s", head_layers=0)
    model = create_model(cfg, len(CLASSES))
    model.data = model.data.model_copy(update={"interpolation": "bilinear"})
    schedule = TrainConfig(head_epochs=0, epochs=6, lr=3e-3, batch_size=32, patience=6)
    fit(model, train, train, schedule, FitSetup(num_classes=len(CLASSES), seed=0, runtime=CPU))
    path = root / "finetuned.pt"
    save_checkpoint(path, model.eval(), cfg, list(CLASSES), image_size=SIZE, interpolation="bilinear")
    return path, root / "photos/test"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root of its own with an empty MLflow store (artifacts under it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("registry")  # not the active experiment id an earlier test left, of another store
    return tmp_path


def scores(test: float, add: float | None) -> dict[str, dict[str, float]]:
    return {"test": {"accuracy": test}} | ({} if add is None else {"test-add": {"accuracy": add}})


def test_a_challenger_must_win_on_test_and_not_lose_on_test_add() -> None:
    old = Scores(test=0.80, test_add=0.60)
    assert beats(Scores(0.81, 0.60), old)[0]  # better on test, equal on test-add
    assert not beats(Scores(0.81, 0.59), old)[0]  # bought test with robustness
    assert not beats(Scores(0.80, 0.70), old)[0]  # a tie on test is no win
    assert beats(Scores(0.81, None), old)[0]  # no test-add on one side: test decides
    won, why = beats(Scores(0.81, 0.59), old)
    assert why == "test 0.8100 > 0.8000, test-add 0.5900 < 0.6000"
    # scored on other test images: no comparison, whatever the numbers
    a, b = torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([0, 1])
    same, other = data_digest((a, b)), data_digest((a, torch.tensor([1, 0])))
    assert same == data_digest((a.clone(), b.clone())) and same != other
    assert beats(Scores(0.99, 0.99, same), Scores(0.80, 0.60, same))[0]
    won, why = beats(Scores(0.99, 0.99, other), Scores(0.80, 0.60, same))
    assert not won and why.startswith("test data changed")


def test_publish_registers_versions_and_moves_the_champion_only_on_a_win(
    digits: tuple[Path, Path], store: Path
) -> None:
    checkpoint, _ = digits
    example = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    decisions = []
    for test, add in ((0.70, 0.50), (0.75, 0.40), (0.80, 0.55)):
        with mlflow.start_run() as run:
            decisions.append(publish(checkpoint, name=NAME, metrics=scores(test, add), tta="none", example=example))
        assert mlflow.get_run(run.info.run_id).data.tags["sstl.champion"] == decisions[-1]["champion"]
    assert [d["champion"] for d in decisions] == ["promoted", "kept", "promoted"]
    assert "test-add 0.4000 < 0.5000" in decisions[1]["champion_reason"]
    client = MlflowClient()
    assert client.get_registered_model(NAME).aliases == {CHAMPION: 3}
    assert client.get_model_version(NAME, "2").tags["champion"] == "kept"


def test_a_temp_experiment_registers_into_the_project_not_its_copy(
    digits: tuple[Path, Path], store: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dvc exp run --temp` runs evaluate in a copy it deletes afterwards, with DVC_ROOT = the project
    copy = tmp_path_factory.mktemp("dvc-temp-copy")
    (copy / "models").mkdir()
    (copy / "models/finetuned.pt").write_bytes(digits[0].read_bytes())
    monkeypatch.setenv("DVC_ROOT", str(store))
    monkeypatch.chdir(copy)
    with tracking.stage_run("evaluate", "sstl", {}):  # as the stage does: the project's experiment
        example = np.zeros((8, 8, 3), np.uint8)
        publish(Path("models/finetuned.pt"), name=NAME, metrics=scores(0.9, None), tta="none", example=example)
    monkeypatch.chdir(store)
    shutil.rmtree(copy)
    model = load(f"models:/{NAME}@{CHAMPION}")
    assert model.classes == list(CLASSES) and not (store / "models").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_answers_real_photos_over_http_like_predict(digits: tuple[Path, Path], store: Path) -> None:
    checkpoint, test_folder = digits
    with mlflow.start_run():
        publish(checkpoint, name=NAME, metrics=scores(0.9, None), tta="flip", example=np.zeros((8, 8, 3), np.uint8))
    photos = sorted(test_folder.glob("*/*.png"))[::3]  # 60 real test digits, every class
    truth = [p.parent.name for p in photos]
    local = CliRunner().invoke(
        app, ["predict", *map(str, photos), "--model", f"models:/{NAME}@{CHAMPION}", "-k", "10", "--format", "json"]
    )
    assert local.exit_code == 0, local.output
    expected = [{p["class"]: p["probability"] for p in r["predictions"]} for r in json.loads(local.stdout)]

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sstl.cli", "serve", "--model", f"models:/{NAME}@{CHAMPION}", "--port", str(port)],
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # MLflow imports and loads the model first: slow on a busy machine
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None, "sstl serve exited before answering"
                time.sleep(1)
        images = [[base64.b64encode(p.read_bytes()).decode()] for p in photos]
        status, body = post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": images}})
        assert status == 200, body
        rows = body["predictions"]
        for row, probs in zip(rows, expected, strict=True):  # the served model is the one predict reads
            # another process, other thread counts: the last float bits may differ, not the answer
            assert max(abs(row["probabilities"][c] - p) for c, p in probs.items()) <= 2e-4
        accuracy = np.mean([r["class"] == t for r, t in zip(rows, truth, strict=True)])
        assert accuracy >= 0.8, accuracy  # a trained digit classifier, not chance (0.1)
        for r in rows:
            assert set(r["probabilities"]) == set(CLASSES)
            assert abs(sum(r["probabilities"].values()) - 1) < 0.01
            assert r["probability"] == max(r["probabilities"].values())
        status, body = post(
            f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}
        )
        assert status == 400 and "image 0" in body["message"]  # not an image: the client is told which
    finally:
        server.send_signal(signal.SIGTERM)  # sstl serve takes MLflow's workers down with it
        server.wait(timeout=60)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=2)


def test_predict_and_serve_name_a_missing_model_in_one_line(store: Path, tmp_path: Path) -> None:
    photo = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    res = CliRunner().invoke(app, ["predict", str(photo), "--model", "models:/nothing@champion"])
    assert res.exit_code == 1 and res.stderr.startswith("error: model models:/nothing@champion")
    assert len(res.stderr.strip().splitlines()) == 1


def test_serve_refuses_what_would_hurt_it_in_one_line_each(digits: tuple[Path, Path], store: Path) -> None:
    checkpoint, test_folder = digits
    with mlflow.start_run():
        publish(checkpoint, name=NAME, metrics=scores(0.9, None), tta="none", example=np.zeros((8, 8, 3), np.uint8))
    port = free_port()
    limits = {"max_body_mb": 0.05, "max_pixels": 64 * 64, "max_images": 4}
    cmd = [sys.executable, "-m", "sstl.track.serve", "--model", f"models:/{NAME}@{CHAMPION}", "--port", str(port)]
    server = subprocess.Popen(
        [*cmd, "--config", json.dumps(limits)], cwd=store, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def ask(body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{url}/invocations", body, {"Content-Type": "application/json"} | (headers or {})
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def images(*pngs: bytes) -> bytes:
        data = [[base64.b64encode(p).decode()] for p in pngs]
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()

    photo = next(test_folder.glob("*/*.png")).read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (200, 200)).save(buf, format="PNG")  # 40,000 px in a few hundred bytes
    big = buf.getvalue()
    try:
        deadline = time.time() + 300
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(1)
        status, body = ask(images(photo))
        assert status == 200 and body["predictions"][0]["class"] in CLASSES
        refused = {
            "csv": ask(b"image\nabc\n", {"Content-Type": "text/csv"}),
            "another site": ask(images(photo), {"Origin": "http://evil.example"}),
            "rebinding": ask(images(photo), {"Host": f"evil.example:{port}"}),
            "big body": ask(b'{"inputs": ["' + b"A" * 80_000 + b'"]}'),
            "bomb": ask(images(big)),
            "no image": ask(json.dumps({"dataframe_split": {"columns": ["image"], "data": []}}).encode()),
            "too many": ask(images(*[photo] * 5)),
            "not json": ask(b"{not json"),
            "not an image": ask(images(b"not an image")),
            "layout": ask(b'{"rows": []}'),
        }
        expected = {
            "csv": 415, "another site": 403, "rebinding": 403, "big body": 413, "bomb": 413, "no image": 400,
            "too many": 413, "not json": 400, "not an image": 400, "layout": 400,
        }  # fmt: skip
        assert {k: s for k, (s, _) in refused.items()} == expected
        for what, (_, body) in refused.items():
            assert set(body) == {"error_code", "message"}, what
            assert "\n" not in body["message"] and "Traceback" not in body["message"], what
            assert str(store) not in body["message"] and "site-packages" not in body["message"], what
        assert "200 x 200 px, over serve.max_pixels" in refused["bomb"][1]["message"]
        assert refused["not an image"][1]["message"].startswith("image 0: ")
        status, _ = ask(images(photo))  # still serving
        assert status == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert "Traceback" not in server.stderr.read()
