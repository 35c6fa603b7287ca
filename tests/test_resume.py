"""Kill -9 anywhere, lose at most one epoch: fit and the tune stage resume bit for bit.

A child process trains with a state file and SIGKILLs itself (a real kill: no handler, no cleanup)
when epoch k's row is reported, i.e. after epoch k trained but before its state was saved; a fresh
process resumes and must end with the weights (torch.equal) and history of a run never killed.

The run never killed, the killed one and the resumed one are all fresh processes started alike, as a
user's are, with oneDNN's kernels pinned: in a CI run (2026-12-07, commit b0984b4) a child computed
its convolutions with oneDNN's AVX2 kernels while the pytest worker that started it used AVX-512 ones
(epoch 1's loss 0.6627489626407623 against 0.6627489924430847; ONEDNN_MAX_CPU_ISA=AVX2 gives the
child's figure here). Bit-identical resumption is a promise for one machine and one set of kernels.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from test_training import TRAIN, VAL, dark_vs_bright, new_model

from sstl.config.train import AugmentConfig, TrainConfig
from sstl.core.files import write_csv, write_json
from sstl.data.dataset import save_images
from sstl.data.transforms import augmenter
from sstl.pipeline.stage import stage_main
from sstl.runtime.device import CPU
from sstl.train.loop import FitResult, fit
from sstl.train.setup import FitSetup

# 3 + 3 epochs, no early stop on this problem: kills can land in either phase and at the boundary
SCHEDULE = TrainConfig(
    head_epochs=3, epochs=3, lr=3e-3, finetune_lr=1e-3, unfreeze_blocks=2, batch_size=20, patience=3, plateau_patience=1
)
EPOCHS = SCHEDULE.head_epochs + SCHEDULE.epochs
TESTS = Path(__file__).parent
PICK = random.SystemRandom()  # where to kill: fit reseeds the global `random`, so it would always pick alike

# argv: tests dir, mode, epoch to die at (0: never), state path ("": none), where to save the result
CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from test_resume import train

def die(row):
    if row["epoch"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

model, result = train(sys.argv[2], state=Path(sys.argv[4]) if sys.argv[4] else None, on_epoch=die)
torch.save({"weights": model.state_dict(), "result": result}, sys.argv[5])
"""
# the same threads as this process, and the same oneDNN kernels whatever the machine decides per process
CHILD_ENV = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "ONEDNN_MAX_CPU_ISA": "AVX2"}


def train(
    mode: str, *, state: Path | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None
) -> tuple[torch.nn.Module, FitResult]:
    """plain: phase 1 on backbone features, then phase 2; augmented: both phases on augmented images."""
    model = new_model()  # resnet18 with dropout: the torch RNG matters too
    augment = augmenter(AugmentConfig(), int(TRAIN.images.shape[1]), 0) if mode == "augmented" else None
    result = fit(
        model,
        TRAIN,
        VAL,
        SCHEDULE,
        FitSetup(num_classes=2, seed=0, augment=augment, runtime=CPU),
        on_epoch=on_epoch,
        state=state,
    )
    return model, result


def in_child(mode: str, out: Path, *, state: Path | None = None, die_at: int = 0) -> tuple[int, str]:
    """Train in a fresh process (which SIGKILLs itself when epoch `die_at` is reported); its exit code
    and stdout. A run that ends saves its weights and FitResult to `out` (read them with `result`)."""
    cmd = [sys.executable, "-c", CHILD, str(TESTS), mode, str(die_at), str(state or ""), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | CHILD_ENV)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
    return done.returncode, done.stdout


def result(out: Path) -> tuple[dict[str, torch.Tensor], FitResult]:
    saved = torch.load(out, weights_only=False)  # written by this test's own child
    return saved["weights"], saved["result"]


def killed_at(mode: str, epoch: int, state: Path) -> str:
    """Train in a child process that SIGKILLs itself when epoch `epoch` is reported; its stdout."""
    code, stdout = in_child(mode, state.with_suffix(".never"), state=state, die_at=epoch)
    assert code == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
    return stdout


def strip(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same(a: tuple[torch.nn.Module, FitResult], b: tuple[torch.nn.Module, FitResult]) -> None:
    assert_same_weights((a[0].state_dict(), a[1]), (b[0].state_dict(), b[1]))


def assert_same_weights(
    a: tuple[dict[str, torch.Tensor], FitResult], b: tuple[dict[str, torch.Tensor], FitResult]
) -> None:
    assert strip(a[1].history) == strip(b[1].history)
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[torch.nn.Module, FitResult]]:
    return {}


def uninterrupted(reference: dict, mode: str) -> tuple[torch.nn.Module, FitResult]:
    """The run never killed, in this process: for the tests that resume in this process too."""
    if mode not in reference:
        reference[mode] = train(mode)
        assert len(reference[mode][1].history) == EPOCHS, "the kills below assume no early stop"
    return reference[mode]


def uninterrupted_child(reference: dict, mode: str, tmp: Path) -> tuple[dict[str, torch.Tensor], FitResult]:
    """The run never killed, in a fresh process: for the kill tests, whose runs are all fresh processes."""
    key = f"{mode} in a child"
    if key not in reference:
        in_child(mode, tmp / "uninterrupted.pt")
        reference[key] = result(tmp / "uninterrupted.pt")
        assert len(reference[key][1].history) == EPOCHS, "the kills below assume no early stop"
    return reference[key]


def killed_and_resumed(mode: str, k: int, tmp: Path) -> tuple[dict[str, torch.Tensor], FitResult]:
    """Killed when epoch k is reported, then resumed by a fresh process, which must say so."""
    state = tmp / "state.pt"
    killed_at(mode, k, state)
    assert state.is_file()
    _, stdout = in_child(mode, tmp / "resumed.pt", state=state)
    assert f"train: resuming from epoch {k} of {EPOCHS} ({state})" in stdout
    assert not state.exists(), "fit removes its state when it returns"
    resumed = result(tmp / "resumed.pt")
    assert resumed[1].resumed_from_epoch == k - 1, k
    return resumed


def test_fit_killed_in_phase_1_on_features_resumes_bit_identical(reference: dict, tmp_path: Path) -> None:
    k = PICK.randint(2, SCHEDULE.head_epochs)  # the head on cached features
    resumed = killed_and_resumed("plain", k, tmp_path)
    assert_same_weights(uninterrupted_child(reference, "plain", tmp_path), resumed)


def test_augmented_fit_killed_in_phase_2_resumes_bit_identical(reference: dict, tmp_path: Path) -> None:
    k = PICK.randint(SCHEDULE.head_epochs + 1, EPOCHS)  # albumentations' own RNGs; k = 4: the phase boundary
    resumed = killed_and_resumed("augmented", k, tmp_path)
    assert_same_weights(uninterrupted_child(reference, "augmented", tmp_path), resumed)


class Stop(Exception):
    pass


def partial_state(path: Path, *, seed: int = 0, epochs: int = 2) -> None:
    """A state saved after `epochs` epochs (the run stops while reporting the next one)."""

    def stop(row: dict[str, float]) -> None:
        if row["epoch"] == epochs + 1:
            raise Stop

    with pytest.raises(Stop):
        fit(
            new_model(),
            TRAIN,
            VAL,
            SCHEDULE,
            FitSetup(num_classes=2, seed=seed, runtime=CPU),
            on_epoch=stop,
            state=path,
        )
    assert path.is_file()


def test_state_of_another_run_is_ignored_and_overwritten(
    reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state.pt"
    partial_state(state, seed=1)  # another seed: another fingerprint
    capsys.readouterr()
    seen: list[str] = []
    again = train("plain", state=state, on_epoch=lambda row: seen.append(torch.load(state)["fingerprint"]))
    assert "saved by another run" in capsys.readouterr().out
    assert again[1].resumed_from_epoch == 0
    assert len(set(seen[1:])) == 1 and seen[1] != seen[0], "the first save replaced the other run's state"
    assert_same(uninterrupted(reference, "plain"), again)


def test_truncated_state_is_ignored(reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.pt"
    partial_state(state)
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    again = train("plain", state=state)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ignoring" in ln]
    assert len(lines) == 1 and "unreadable" in lines[0], lines
    assert again[1].resumed_from_epoch == 0
    assert_same(uninterrupted(reference, "plain"), again)


def test_divergence_names_epoch_batch_and_lr_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state.pt"
    model = new_model()

    def poison(row: dict[str, float]) -> None:  # NaN weights after epoch 1: epoch 2's first loss is NaN
        if row["epoch"] == 1:
            with torch.no_grad():
                next(model.head.parameters()).fill_(float("nan"))

    @stage_main
    def main() -> None:
        fit(model, TRAIN, VAL, SCHEDULE, FitSetup(num_classes=2, seed=0, runtime=CPU), on_epoch=poison, state=state)

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged: loss nan at epoch 2, batch 1 (lr 0.003)"), err
    assert not state.exists(), "a diverged fit leaves no state: resuming it would diverge again"


# --- the tune stage, killed during trial j -------------------------------------------------------

TUNE = {
    "device": "cpu",
    "tune": {
        "n_random": 2,
        "n_guided": 1,
        "space": {"lr": {"low": 0.001, "high": 0.01, "prior": "log-uniform"}, "epochs": {"low": 2, "high": 3}},
    },
    "teacher": {"arch": "convnet_s", "head_epochs": 1, "batch_size": 20, "hidden_size": 16},
}
TUNE_OUT = ("best_params.json", "trials.csv", "convergence.csv")
# the stage's own arguments, as dvc.yaml's cmd gives them (its paths are written there once)
TUNE_ARGS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tune"]["cmd"].split()[2:]


def tune_project(root: Path) -> Path:
    """A project with just what the tune stage reads: params.yaml and data/prepared."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = TUNE["device"]
    params["tune"].update(TUNE["tune"])  # `space` replaced as a whole
    params["teacher"].update(TUNE["teacher"])
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = root / "data" / "prepared"
    rows = []
    for split, data in (("labeled", TRAIN), ("val", VAL), ("unlabeled", dark_vs_bright(4, 2))):
        save_images(prepared / f"{split}.npy", np.asarray(data.images))
        for path, label in zip(data.paths, data.labels.tolist(), strict=True):
            rows.append({"path": f"{split}/{path}", "split": split, "label": str(label), "label_index": label})
    write_csv(prepared / "manifest.csv", [r | {"sha256": ""} for r in rows])
    write_json(prepared / "classes.json", ["dark", "bright"])
    return root


def tune_env() -> dict[str, str]:
    """Every run of the stage is a fresh process started alike (this test's MLflow store included)."""
    return os.environ | CHILD_ENV | {"PYTHONPATH": str(ROOT / "src")}


def kill_during_trial(project: Path, trial: int) -> None:
    """Run the tune stage in a child; SIGKILL it a random moment after trial `trial` saved an epoch."""
    cmd = [sys.executable, str(ROOT / "stages" / "tune.py"), *TUNE_ARGS]
    child = subprocess.Popen(cmd, cwd=project, env=tune_env(), stdout=subprocess.DEVNULL)
    mark, deadline = project / f".sstl-state/tune/trial-{trial:02d}.pt", time.monotonic() + 300
    while not mark.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(PICK.uniform(0.0, 0.1))
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the stage ended before the kill: nothing was tested"


def tune_in_child(project: Path) -> str:
    """The tune stage run to its end in a fresh process, as the kill's child is started; its stdout."""
    cmd = [sys.executable, str(ROOT / "stages" / "tune.py"), *TUNE_ARGS]
    done = subprocess.run(cmd, cwd=project, env=tune_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_tune_killed_in_a_trial_resumes_byte_identical(tmp_path: Path) -> None:
    outputs = {}
    for name in ("reference", "killed"):
        project = tune_project(tmp_path / name)
        trial = PICK.randint(1, 2)  # of trials 0, 1, 2: trial 0 is replayed from trials.json
        if name == "killed":
            kill_during_trial(project, trial)
            saved = json.loads((project / ".sstl-state/tune/trials.json").read_text())
            assert len(saved["trials"]) >= trial, trial
        log = tune_in_child(project)
        outputs[name] = {f: (project / "reports/tune" / f).read_bytes() for f in TUNE_OUT}
        if name == "killed":
            assert "tune: resuming after trial" in log, log
    assert outputs["killed"] == outputs["reference"]
    assert b"seconds" not in outputs["reference"]["trials.csv"], "wall time would make the DVC output unstable"
