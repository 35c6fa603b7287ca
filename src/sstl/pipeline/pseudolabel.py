"""The pseudolabel stage's body and the student's view of its output (the selected rows and their targets)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sstl.config.pseudo import SelectConfig
from sstl.core.errors import SstlError
from sstl.core.files import file_digest, read_csv
from sstl.data.dataset import ImageSet, load_images, load_split
from sstl.models.checkpoint import model_of, read_checkpoint
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.pseudo.ood import in_distribution
from sstl.pseudo.pool import select_pool_logits
from sstl.pseudo.select import balance_to_prior, soft_targets
from sstl.runtime.device import Runtime


def pseudolabel(
    model: Classifier,
    prepared: Path,
    cfg: SelectConfig,
    classes: list[str],
    *,
    state_dir: Path | None = None,
    on_shard: Callable[[int], None] | None = None,
    runtime: Runtime,
) -> Pseudo | None:
    """Stream the teacher over the prepared unlabelled pool and select: (selected rows, per-class
    counts, soft targets, rows dropped as out of distribution), the soft targets float32 (M, C), row
    i = softmax(logits / cfg.temperature) of the image of rows[i] (an image selected for two classes
    has its distribution in both rows). With `cfg.ood_quantile`, selected images of no class are
    dropped first (sstl.pseudo.ood); with `cfg.balance`, the rest is then cut to the prior's shares.

    The pool is read shard by shard from its memory-mapped .npy (see select_pool_logits: resumable
    from `state_dir`, shared among torchrun processes). None on torchrun ranks other than 0.
    """
    images = load_images(prepared, "unlabeled")
    manifest = Path(prepared) / "manifest.csv"
    selected = select_pool_logits(
        model,
        images,
        cfg,
        len(classes),
        state_dir=state_dir,
        pool_id=file_digest(manifest),
        on_shard=on_shard,
        runtime=runtime,
    )
    if selected is None:
        return None
    (index, label, score), logits = selected.selection, selected.logits
    dropped: list[dict[str, Any]] = []
    if cfg.ood_quantile is not None:
        keep, sims, cut = _ood_filter(model, images, prepared, index, cfg.ood_quantile, runtime=runtime)
        paths = split_paths(manifest, "unlabeled", set(index[~keep].tolist()))
        dropped = [
            {
                "index": i,
                "path": paths[i],
                "predicted": classes[c],
                "similarity": round(m, 6),
                "threshold": round(cut, 6),
            }
            for i, c, m in zip(index[~keep].tolist(), label[~keep].tolist(), sims[~keep].tolist(), strict=True)
        ]
        index, label, score, logits = index[keep], label[keep], score[keep], logits[keep]
    if cfg.balance != "none":
        keep = balance_to_prior(
            label, score, selected.prior if cfg.balance == "pool" else labelled_prior(manifest, classes)
        )
        index, label, score, logits = index[keep], label[keep], score[keep], logits[keep]
    paths = split_paths(manifest, "unlabeled", set(index.tolist()))
    rows = [
        {"index": i, "path": paths[i], "label": classes[c], "label_index": c, "score": round(s, 6)}
        for i, c, s in zip(index.tolist(), label.tolist(), score.tolist(), strict=True)
    ]
    n = Counter(r["label"] for r in rows)
    counts = [{"class": name, "count": n.get(name, 0)} for name in classes]
    return Pseudo(rows, counts, soft_targets(logits, cfg.temperature), dropped)


class Pseudo(NamedTuple):
    rows: list[dict[str, Any]]  # the selected pool images: index, path, label, label_index, score
    counts: list[dict[str, Any]]  # per class: class, count
    probs: torch.Tensor  # (M, C) float32 soft targets, row i of rows[i]
    ood: list[dict[str, Any]]  # selected, then dropped as of no class: index, path, predicted, similarity, threshold


def probes_of(
    teacher: dict[str, Any], probes: Path, device: torch.device | str = "cpu", *, extra: Sequence[str] = ()
) -> list[tuple[str, Classifier]]:
    """[(name, model)] of the probe stage's frozen-feature probes in the folder `probes`: the probe of the
    backbone of `teacher` (a checkpoint's payload), then the probe of each ImageNet backbone of `extra`
    (params probe.extra: frozen backbones neither teacher nor student fine-tunes, which err on other
    photos), in that order; each checkpoint read once."""
    wanted = list(
        dict.fromkeys([(teacher["model"]["arch"], teacher["model"]["weights"])] + [(a, "imagenet") for a in extra])
    )
    found: dict[tuple[str, str], tuple[str, Classifier]] = {}
    for path in sorted(Path(probes).glob("*.pt")):
        payload = read_checkpoint(path)  # a network built only for the probes wanted
        key = (payload["model"]["arch"], payload["model"]["weights"])
        if key in wanted and key not in found:
            found[key] = (path.stem, model_of(payload, path, device))
    if wanted[0] not in found:
        raise SstlError(
            f"pseudolabel.with_probe: no probe of the teacher's backbone ({wanted[0][0]}, weights {wanted[0][1]}) in "
            f"{probes}: set probe.enabled: true (and re-run the probe stage) or pseudolabel.with_probe: false"
        )
    missing = [arch for arch, weights in wanted[1:] if (arch, weights) not in found]
    if missing:
        raise SstlError(
            f"pseudolabel.with_probe: no probe of probe.extra's {', '.join(missing)} in {probes}: re-run the probe "
            "stage (dvc repro probe)"
        )
    return [found[key] for key in wanted]


def _ood_filter(
    model: Classifier, images: Any, prepared: Path, index: torch.Tensor, quantile: float, *, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(keep, similarity, threshold) of the selected rows `index`: the teacher's features of those pool
    images against the labelled rows', calibrated on val (sstl.pseudo.ood)."""
    unique, where = torch.unique(index, return_inverse=True)  # an image selected for two classes: once
    picked = torch.from_numpy(np.ascontiguousarray(images[unique.numpy()])) if len(unique) else None
    feats = {
        split: infer(
            model, load_split(prepared, split).images, runtime=runtime, desc=f"{split} features", features=True
        )
        for split in ("labeled", "val")
    }
    pool = (
        infer(model, picked, runtime=runtime, desc="pool features", features=True)
        if picked is not None
        else torch.zeros(0, feats["labeled"].shape[1])
    )
    keep, sims, cut = in_distribution(pool, feats["labeled"], feats["val"], quantile=quantile)
    return keep[where], sims[where], round(cut, 6)


def labelled_prior(manifest: Path, classes: list[str]) -> torch.Tensor:
    """(C,) the class shares of the labelled rows (the teacher's training rows)."""
    labels = [int(r["label_index"]) for r in read_csv(manifest) if r["split"] == "labeled"]
    return torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(classes)).float() / max(len(labels), 1)


def split_paths(manifest: Path, split: str, wanted: set[int]) -> dict[int, str]:
    """{position in `split`: path} for the wanted positions, reading the manifest row by row."""
    found: dict[int, str] = {}
    with Path(manifest).open(newline="", encoding="utf-8") as f:
        rows = (r["path"] for r in csv.DictReader(f) if r["split"] == split)
        for i, path in enumerate(rows):
            if i in wanted:
                found[i] = path
    return found


def pseudo_set(pool: ImageSet, rows: list[dict[str, str]]) -> ImageSet:
    """The pseudo-labelled images as an ImageSet (an image chosen for two classes appears twice)."""
    index = torch.tensor([int(r["index"]) for r in rows], dtype=torch.int64)
    chosen = pool.subset(index)
    chosen.labels = torch.tensor([int(r["label_index"]) for r in rows], dtype=torch.int64)
    return chosen


def pseudo_targets(
    pool: ImageSet, rows: list[dict[str, str]], probs: np.ndarray | torch.Tensor
) -> tuple[ImageSet, torch.Tensor]:
    """The pseudo-labelled images with their hard labels (pseudo_set) and soft targets: float32 (M, C),
    row i the teacher's distribution for rows[i] (the .csv and .npy as the pseudolabel stage wrote
    them, its --labels and --probs; for a cross-entropy with probability targets)."""
    targets = probs.float() if isinstance(probs, torch.Tensor) else torch.from_numpy(np.array(probs, dtype=np.float32))
    if targets.ndim != 2 or len(targets) != len(rows):
        raise SstlError(
            f"the soft targets hold {tuple(targets.shape)} values for {len(rows)} pseudo-labels: they must be "
            "(pseudo-labels, classes) of the same pseudolabel run (re-run it: `dvc repro pseudolabel`)"
        )
    chosen = pseudo_set(pool, rows)
    if len(rows) and int(chosen.labels.max()) >= targets.shape[1]:
        raise SstlError(
            f"a pseudo-label names class {int(chosen.labels.max())}, the soft targets have {targets.shape[1]}"
        )
    return chosen, targets
