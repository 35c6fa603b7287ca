"""The frozen-feature probe: C chosen by cross-validation as the data call for it, the regression copied
into an sstl head exactly, and the checkpoint it makes scoring like the regression it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from sstl.config.model import ModelConfig
from sstl.core.errors import SstlError
from sstl.eval.probe import choose_c, fit_probe
from sstl.models.checkpoint import load_checkpoint, save_checkpoint
from sstl.models.classifier import Ensemble
from sstl.models.factory import create_model
from sstl.models.inference import infer
from sstl.pipeline.pseudolabel import probes_of
from sstl.runtime.device import CPU

GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def test_cv_picks_a_weak_prior_for_a_faint_clean_signal_and_a_strong_one_for_noisy_labels() -> None:
    rng = np.random.default_rng(0)
    # faint and clean: the class is the sign of a feature 30 times smaller than the rest; only a large C
    # lets its weight grow enough to read it
    x = rng.normal(size=(120, 10))
    x[:, 0] *= 0.03
    faint = choose_c(x, (x[:, 0] > 0).astype(int), grid=GRID, folds=5, seed=0)
    # noisy: one strong feature, 15% of the labels flipped and 99 noise features on 60 rows: a large C
    # bends the fit through the noise features to the flipped rows, a small C keeps to the strong one
    rng = np.random.default_rng(3)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 100))
    x[:, 0] = 3 * (2 * y - 1) + rng.normal(size=60)
    y = np.where(rng.random(60) < 0.15, 1 - y, y)
    noisy = choose_c(x, y, grid=GRID, folds=5, seed=0)
    assert faint.C == 100 and noisy.C <= 0.01, (faint, noisy)
    assert faint.cv_accuracy[100] > faint.cv_accuracy[0.001] + 0.2
    assert noisy.cv_accuracy[noisy.C] > noisy.cv_accuracy[100] + 0.05 and noisy.folds == 5 and noisy.rows == 60


def test_cv_needs_two_labels_per_class() -> None:
    x, y = np.eye(3), np.array([0, 1, 1])
    choice = choose_c(x, y, grid=GRID, folds=5, seed=0)
    assert choice.folds == 0 and choice.cv_accuracy == {} and choice.C in GRID
    assert choose_c(np.eye(6), np.array([0, 0, 1, 1, 1, 0]), grid=GRID, folds=5, seed=0).folds == 3  # capped


def _digits(classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real handwritten digits (scikit-learn's 8x8 scans) as uint8 RGB at 16 px."""
    d = load_digits(n_class=classes)
    img = torch.from_numpy(d.images / 16.0 * 255).to(torch.uint8)  # (N, 8, 8)
    img = img.repeat_interleave(2, 1).repeat_interleave(2, 2)[..., None].expand(-1, -1, -1, 3).contiguous()
    return img, torch.from_numpy(d.target)


@pytest.mark.parametrize("classes", [2, 4])
def test_the_head_is_the_regression_and_the_checkpoint_scores_like_it(classes: int, tmp_path: Path) -> None:
    images, labels = _digits(classes)
    train, test = slice(0, 120), slice(120, 240)
    cfg = ModelConfig(arch="convnet_s", weights="none", head_layers=0, dropout=0.0)
    torch.manual_seed(0)
    model = create_model(cfg, classes)
    choice = fit_probe(
        model, images[train], labels[train], num_classes=classes, grid=GRID, folds=5, seed=0, runtime=CPU
    )
    feats = infer(model, images, runtime=CPU, features=True).double().numpy()
    mean = feats[train].mean(0)  # the probe's scaling, written out: centred, one global scale
    feats = (feats - mean) / np.sqrt(((feats[train] - mean) ** 2).mean())
    reference = LogisticRegression(C=choice.C, max_iter=2000, random_state=0).fit(feats[train], labels[train].numpy())
    path = tmp_path / "probe.pt"
    save_checkpoint(path, model, cfg, [str(c) for c in range(classes)], 16)
    loaded, _ = load_checkpoint(path)
    logits = infer(loaded, images[test], runtime=CPU)
    want = reference.predict_proba(feats[test])
    assert np.abs(logits.softmax(1).numpy() - want).max() < 1e-3
    accuracy = float((logits.argmax(1) == labels[test]).float().mean())
    assert accuracy > 0.8, accuracy  # random conv features of real digits are separable enough


def test_the_probe_refuses_an_mlp_head_and_a_class_without_labels() -> None:
    images, labels = _digits(3)
    mlp = create_model(ModelConfig(arch="convnet_s", head_layers=1), 3)
    with pytest.raises(ValueError, match="head_layers 0"):
        fit_probe(mlp, images, labels, num_classes=3, grid=GRID, folds=5, seed=0, runtime=CPU)
    linear = create_model(ModelConfig(arch="convnet_s", head_layers=0), 4)
    with pytest.raises(Exception, match=r"class indices \[3\] have none"):
        fit_probe(linear, images, labels, num_classes=4, grid=GRID, folds=5, seed=0, runtime=CPU)


def test_the_teacher_with_its_probe_scores_the_mean_of_their_distributions(tmp_path: Path) -> None:
    """pseudolabel.with_probe: the pool is scored by the teacher and the probe of its backbone (found in
    the probe stage's folder by arch and weights), the mean of their two distributions."""
    images, labels = _digits(3)
    torch.manual_seed(0)
    probe_cfg = ModelConfig(arch="convnet_s", weights="none", head_layers=0, dropout=0.0)
    probe = create_model(probe_cfg, 3)
    fit_probe(probe, images[:90], labels[:90], num_classes=3, grid=GRID, folds=3, seed=0, runtime=CPU)
    other_cfg = ModelConfig(arch="convnet_m", weights="none", head_layers=0, dropout=0.0)
    probes = tmp_path / "probes"
    save_checkpoint(probes / "probe.pt", probe, probe_cfg, ["0", "1", "2"], 16)
    save_checkpoint(probes / "probe_student.pt", create_model(other_cfg, 3), other_cfg, ["0", "1", "2"], 16)
    teacher_cfg = ModelConfig(arch="convnet_s", weights="none", head_layers=1, hidden_size=32)
    teacher = create_model(teacher_cfg, 3)  # another head on another random backbone: it disagrees with the probe
    save_checkpoint(tmp_path / "teacher.pt", teacher, teacher_cfg, ["0", "1", "2"], 16)
    teacher, meta = load_checkpoint(tmp_path / "teacher.pt")

    [(name, found)] = probes_of(meta, probes)
    assert name == "probe"
    both = Ensemble([teacher, found])
    test = images[90:150]
    p_teacher, p_probe = (infer(m, test, runtime=CPU).softmax(1) for m in (teacher, probe))
    p_both = infer(both, test, runtime=CPU).softmax(1)
    assert (p_teacher - p_probe).abs().max() > 0.1, "the members must disagree for the mean to show"
    assert torch.allclose(p_both, (p_teacher + p_probe) / 2, atol=1e-5)
    assert torch.equal(infer(both, test, runtime=CPU, features=True), infer(teacher, test, runtime=CPU, features=True))

    meta["model"]["arch"] = "convnet_l"  # a teacher no probe shares a backbone with
    with pytest.raises(SstlError, match=r"no probe of the teacher's backbone \(convnet_l.*probe.enabled: true"):
        probes_of(meta, probes)


def test_extra_backbones_are_probed_once_and_join_the_teachers_ensemble(tmp_path: Path) -> None:
    """probe.extra: the probe stage fits a probe of each listed ImageNet backbone beside the teacher's and
    the student's (probe_<arch>, one per backbone); with pseudolabel.with_probe they join the ensemble after
    the teacher's probe, even where the backbone was trained at another side (Lite1: 240 px, Lite0: 224)."""
    from sstl.params import Params
    from sstl.pipeline.probe import backbones

    lite = {"weights": "imagenet", "head_layers": 0}
    p = Params.model_validate(
        {
            "teacher": {"arch": "tf_efficientnet_lite0", **lite},
            "student": {"arch": "tf_efficientnet_lite2", **lite},
            "probe": {"extra": ["tf_efficientnet_lite1", "tf_efficientnet_lite0"]},  # Lite0 is the teacher's
        }
    )
    found = backbones(p, tmp_path / "pretrain.pt")
    assert list(found) == ["probe", "probe_student", "probe_tf_efficientnet_lite1"]
    assert (found["probe_tf_efficientnet_lite1"].arch, found["probe_tf_efficientnet_lite1"].weights) == (
        "tf_efficientnet_lite1",
        "imagenet",
    )

    probes, classes = tmp_path / "probes", ["0", "1", "2"]
    for name, cfg in found.items():
        if name != "probe_student":
            save_checkpoint(probes / f"{name}.pt", create_model(cfg, 3), cfg, classes, 32)
    teacher, meta = load_checkpoint(probes / "probe.pt")  # a Lite0 network as the teacher
    members = probes_of(meta, probes, extra=["tf_efficientnet_lite1"])
    assert [n for n, _ in members] == ["probe", "probe_tf_efficientnet_lite1"]
    lite1 = members[1][1]
    assert lite1.data.input_size != 224
    with pytest.raises(SstlError, match=r"no probe of probe.extra's tf_efficientnet_lite2 .*dvc repro probe"):
        probes_of(meta, probes, extra=["tf_efficientnet_lite2"])

    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    p_teacher, p_lite1 = (infer(m, images, runtime=CPU).softmax(1) for m in (teacher, lite1))
    both = infer(Ensemble([teacher, lite1]), images, runtime=CPU).softmax(1)
    assert torch.allclose(both, (p_teacher + p_lite1) / 2, atol=1e-5)
    other = create_model(ModelConfig(arch="convnet_s", weights="none", head_layers=0), 3)  # ImageNet's mean and std
    with pytest.raises(ValueError, match="must preprocess alike"):
        Ensemble([teacher, other])
