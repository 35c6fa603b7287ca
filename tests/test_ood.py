"""Unlabelled photos of no class: planted foreign photos in a pool of digits are dropped from the
pseudo-labels and listed, the digits kept; the consistency student's screen drops and lists them too
and trains on the rest only; and the nearest-neighbour rule itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from sstl.config.model import ModelConfig
from sstl.config.pseudo import SelectConfig
from sstl.config.train import AugmentConfig, ConsistencyConfig, TrainConfig
from sstl.core.errors import SstlError
from sstl.core.files import read_csv
from sstl.data.dataset import load_split
from sstl.data.demo import write_demo
from sstl.data.prepare import prepare_folder
from sstl.data.transforms import augmenter
from sstl.eval.probe import fit_probe
from sstl.models.factory import create_model
from sstl.pipeline.pseudolabel import pseudolabel
from sstl.pipeline.train import build_model, ood_screen
from sstl.pseudo.ood import in_distribution, nearest_similarity
from sstl.runtime.device import CPU
from sstl.train.consistency import Pool, fit_consistency
from sstl.train.setup import FitSetup

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


def test_the_consistency_students_screen_drops_foreign_photos_and_trains_on_the_rest(
    planted: tuple[Path, set[str]], tmp_path: Path
) -> None:
    prepared, foreign = planted
    labeled, val, pool = (load_split(prepared, s) for s in ("labeled", "val", "unlabeled"))
    out, logged = tmp_path / "ood.csv", []
    cfg = TrainConfig(epochs=1, lr=3e-3, finetune_lr=1e-3, unfreeze_blocks=1, batch_size=16)
    ccfg = ConsistencyConfig(flip=False, strong_views=1, probe_head=False, ood_quantile=0.05)

    def fit(screen: object) -> int:
        model = build_model(ModelConfig(arch="tf_efficientnet_lite0", weights="imagenet", head_layers=0), 10, seed=0)
        setup = FitSetup(num_classes=10, seed=0, runtime=CPU, augment=augmenter(AugmentConfig(hflip=False), 64, 0))
        where = Pool(
            images=pool, soft=torch.zeros(len(pool), 10), chosen=torch.zeros(len(pool), dtype=torch.bool),
            screen=screen,  # type: ignore[arg-type]
        )  # fmt: skip
        return fit_consistency(model, labeled, val, cfg, setup, pool=where, consistency=ccfg).images_seen

    screened = fit(ood_screen(0.05, manifest=prepared / "manifest.csv", out=out, log=logged.append))
    dropped = {r["path"] for r in read_csv(out)}
    digits = len(pool) - N_FOREIGN
    assert len(dropped & foreign) >= 0.9 * N_FOREIGN, f"{len(dropped & foreign)} of {N_FOREIGN} foreign photos dropped"
    assert len(dropped - foreign) <= 0.15 * digits, f"{len(dropped - foreign)} of {digits} digits dropped"
    assert logged == [
        {"n_ood_dropped": len(dropped), "ood_threshold": pytest.approx(float(read_csv(out)[0]["threshold"]))}
    ]
    # the loss sees the kept photos only: an epoch is as many steps as they fill (32 pool photos a step)
    steps = -(-(len(pool) - len(dropped)) // 32)
    assert screened == steps * (16 + 2 * 32)
    with pytest.raises(SstlError, match="every unlabelled photo was screened out"):
        fit(lambda p, _lab, _val: torch.zeros(len(p), dtype=torch.bool))
