"""Unlabelled photos of no class: planted foreign photos in a pool of digits are dropped from the
pseudo-labels and listed, the digits kept; and the nearest-neighbour rule itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from sstl.config.model import ModelConfig
from sstl.config.pseudo import SelectConfig
from sstl.data.dataset import load_split
from sstl.data.demo import write_demo
from sstl.data.prepare import prepare_folder
from sstl.eval.probe import fit_probe
from sstl.models.factory import create_model
from sstl.pipeline.pseudolabel import pseudolabel
from sstl.pseudo.ood import in_distribution, nearest_similarity
from sstl.runtime.device import CPU

N_FOREIGN = 60


def test_nearest_similarity_and_its_calibration() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [-1.0, -1.0], [1.0, 1.0]])
    sims = nearest_similarity(queries, bank)
    assert sims[0] > 0.99 and sims[1] < 0 and abs(sims[2] - 2**-0.5) < 1e-9
    assert nearest_similarity(bank, bank, exclude_self=True).tolist() == [0.0, 0.0]
    keep, centred, cut = in_distribution(queries, bank, queries[:1], quantile=0.5)  # val = the first query alone
    assert keep.tolist() == [True, False, False] and cut == pytest.approx(float(centred[0]))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """A prepared digits folder (64 px) whose unlabelled pool also holds 60 crops of real photos
    (scikit-learn's two sample photos, 200-400 px squares): photos of no class the teacher knows."""
    root = tmp_path_factory.mktemp("ood")
    write_demo(root / "photos", labels_per_class=20, test_fraction=0.05, test_add_fraction=0.0, seed=0)
    rng = np.random.default_rng(0)
    foreign = set()
    (root / "photos/unlabeled/elsewhere").mkdir()
    for i in range(N_FOREIGN):
        photo = load_sample_images().images[i % 2]
        side = int(rng.integers(200, 400))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        name = f"unlabeled/elsewhere/photo{i:02d}.png"
        Image.fromarray(photo[y : y + side, x : x + side]).save(root / "photos" / name)
        foreign.add(name)
    prepare_folder(root / "photos", root / "prepared", image_size=64, val_fraction=0.25, seed=0)
    return root / "prepared", foreign


def test_foreign_photos_are_dropped_and_listed(planted: tuple[Path, set[str]]) -> None:
    prepared, foreign = planted
    labeled = load_split(prepared, "labeled")
    # the photo profile's teacher backbone (ImageNet Lite0, from the lock's weight package) under its
    # probe head: the features the filter reads are what the backbone knows of photos in general
    teacher = create_model(ModelConfig(arch="tf_efficientnet_lite0", weights="imagenet", head_layers=0), 10)
    fit_probe(teacher, labeled.images, labeled.labels, num_classes=10, grid=(0.1, 1.0), folds=3, seed=0, runtime=CPU)
    cfg = SelectConfig(method="threshold", threshold=0.0, batch_size=64, ood_quantile=0.05)  # every pool image
    classes = [str(c) for c in range(10)]
    plain = pseudolabel(teacher, prepared, cfg.model_copy(update={"ood_quantile": None}), classes, runtime=CPU)
    out = pseudolabel(teacher, prepared, cfg, classes, runtime=CPU)
    assert plain is not None and out is not None
    assert foreign <= {r["path"] for r in plain.rows}, "without the filter the foreign photos get labels"
    dropped = {r["path"] for r in out.ood}
    kept = {r["path"] for r in out.rows}
    digits = {r["path"] for r in plain.rows} - foreign
    assert len(dropped & foreign) >= 0.9 * N_FOREIGN, f"{len(dropped & foreign)} of {N_FOREIGN} foreign photos dropped"
    assert len(kept & digits) >= 0.85 * len(digits), f"{len(kept & digits)} of {len(digits)} digits kept"
    assert kept.isdisjoint(dropped) and kept | dropped == {r["path"] for r in plain.rows}
    assert len(out.probs) == len(out.rows) and sum(c["count"] for c in out.counts) == len(out.rows)
    assert all(r["similarity"] < r["threshold"] for r in out.ood)
