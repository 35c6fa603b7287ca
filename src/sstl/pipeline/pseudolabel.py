"""The pseudolabel stage's body and the student's view of its output (the selected rows and their targets)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstl.config.pseudo import SelectConfig
from sstl.core.errors import SstlError
from sstl.core.files import file_digest
from sstl.data.dataset import ImageSet, load_images
from sstl.models.classifier import Classifier
from sstl.pseudo.pool import select_pool_logits
from sstl.pseudo.select import soft_targets
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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor] | None:
    """Stream the teacher over the prepared unlabelled pool and select: (selected rows, per-class
    counts, soft targets), the soft targets float32 (M, C), row i = softmax(logits / cfg.temperature)
    of the image of rows[i] (an image selected for two classes has its distribution in both rows).

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
    (index, label, score), logits = selected
    paths = split_paths(manifest, "unlabeled", set(index.tolist()))
    rows = [
        {"index": i, "path": paths[i], "label": classes[c], "label_index": c, "score": round(s, 6)}
        for i, c, s in zip(index.tolist(), label.tolist(), score.tolist(), strict=True)
    ]
    n = Counter(r["label"] for r in rows)
    counts = [{"class": name, "count": n.get(name, 0)} for name in classes]
    return rows, counts, soft_targets(logits, cfg.temperature)


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
