"""Which unlabelled photos to label next (a labelling queue), and taking the labels back in.

`label-queue` scores the photo folder's unlabeled/ pool with a trained checkpoint and ranks it:

- `margin`: the smallest gap between the two most probable classes first (the model hesitates
  between two classes: a label there moves its decision boundary most);
- `entropy`: the highest predictive entropy first (uncertain over all the classes);
- `diverse`: the CANDIDATES_PER_PICK x n smallest margins, k-means on their backbone features into n
  clusters, the smallest margin of each cluster: uncertain photos that are not all near-copies of
  one confusing kind (a burst of 50 shots of the same coat would fill a margin queue).

The queue is a folder: copies of the chosen photos under images/ and queue.csv (rank order, one row
per photo, an empty `label` column for the labeller). `label-import` reads that CSV back, checks every
label and path first, then moves each labelled photo from unlabeled/ to labeled/<class>/ and appends
what it did to <folder>/label-imports.csv (prepare reads only the split folders, never the root).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sstl.config.runtime import Tta
from sstl.core.errors import SstlError
from sstl.core.files import atomic_folder
from sstl.data.images import IMAGE_SUFFIXES, UnreadableImage, decode, read_file, walk
from sstl.labelling.rank import Features, check_strategy, rank, scores
from sstl.models.checkpoint import load_checkpoint
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.runtime.device import Runtime

QUEUE_CSV = "queue.csv"
IMAGES = "images"
MARKER = ".sstl-label-queue"  # in every folder label-queue writes: the one kind of folder --force replaces
QUEUE_FIELDS = ("rank", "image", "source", "guess", "guess_probability", "second_guess", "score", "label")
CHUNK = 256  # images decoded at once: a pool of 100,000 photos never sits in memory whole


def pool_files(folder: Path) -> list[Path]:
    """Image files under <folder>/unlabeled/ as prepare finds them (any nesting, hidden entries left out)."""
    pool = Path(folder) / "unlabeled"
    if not pool.is_dir():
        raise SstlError(
            f"{pool} not found: pass --folder, the photo folder that holds unlabeled/ "
            "(or set data.folder in params.yaml)"
        )
    files = [p for p, problem in walk(pool, within=[folder]) if not problem and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SstlError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {pool}: nothing to queue")
    return files


def read_images(
    paths: Sequence[Path], size: int, interpolation: str, on_skip: Callable[[Path, str], None]
) -> tuple[np.ndarray, list[Path]]:
    """uint8 (k, size, size, 3) of the readable paths, decoded exactly as predict (and prepare) does."""
    images, readable = [], []
    for path in paths:
        try:
            images.append(decode(read_file(path), size, interpolation))
            readable.append(path)
        except UnreadableImage as err:
            on_skip(path, str(err))
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, readable


def report_skip(path: Path, reason: str) -> None:
    print(f"skipped {path}: {reason}", file=sys.stderr)


@dataclass
class Scored:
    """The readable pool photos and the model's probabilities (N, C) for them."""

    paths: list[Path]
    probs: np.ndarray
    skipped: int = 0


def score_pool(
    model: Classifier,
    paths: Sequence[Path],
    image_size: int,
    *,
    interpolation: str,
    runtime: Runtime,
    tta: Tta = "none",
    on_skip: Callable[[Path, str], None] = report_skip,
) -> Scored:
    """Softmax of `infer`'s logits for every readable photo, a chunk of CHUNK photos at a time."""
    out = Scored([], np.zeros((0, 0), np.float32))
    parts = []

    def skip(path: Path, reason: str) -> None:
        out.skipped += 1
        on_skip(path, reason)

    for a in range(0, len(paths), CHUNK):
        images, readable = read_images(paths[a : a + CHUNK], image_size, interpolation, skip)
        if readable:
            logits = infer(model, torch.from_numpy(images), runtime=runtime, desc="score", tta=tta)
            parts.append(logits.softmax(1).numpy())
            out.paths += readable
    if not parts:
        raise SstlError(f"none of the {len(paths)} unlabelled images could be read: see the lines above")
    out.probs = np.concatenate(parts)
    return out


def feature_reader(
    model: Classifier, paths: Sequence[Path], image_size: int, *, interpolation: str, runtime: Runtime
) -> Features:
    """features(indices) for `rank`: decodes those photos again and runs `infer(..., features=True)`."""

    def get(indices: np.ndarray) -> np.ndarray:
        chosen = [paths[i] for i in indices]
        images, readable = read_images(chosen, image_size, interpolation, report_skip)
        if len(readable) != len(chosen):
            raise SstlError("a photo became unreadable while the queue was being made: run label-queue again")
        return infer(model, torch.from_numpy(images), features=True, desc="features", runtime=runtime).numpy()

    return get


def copy_name(source: Path, pool: Path) -> str:
    """<stem>-<8 hex of its path in unlabeled/><suffix>: the same photo gets the same name in every queue,
    and two photos of the same name in different subfolders get different ones."""
    rel = Path(os.path.relpath(source, pool)).as_posix()
    return f"{source.stem}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}{source.suffix.lower()}"


def queue_rows(
    paths: Sequence[Path], probs: np.ndarray, picks: np.ndarray, strategy: str, classes: Sequence[str], pool: Path
) -> list[dict[str, str]]:
    """One CSV row per pick, best first: image (relative to the CSV), source, the model's two guesses, score."""
    score = scores(probs, strategy)
    rows = []
    for r, i in enumerate(picks.tolist(), start=1):
        order = np.argsort(-probs[i], kind="stable")
        second = classes[order[1]] if len(order) > 1 else ""
        rows.append(
            {
                "rank": str(r),
                "image": f"{IMAGES}/{copy_name(paths[i], pool)}",
                "source": os.path.abspath(paths[i]),
                "guess": classes[order[0]],
                "guess_probability": f"{probs[i, order[0]]:.4f}",
                "second_guess": second,
                "score": f"{score[i]:.4f}",
                "label": "",
            }
        )
    return rows


def check_output(out: Path, *, force: bool) -> None:
    """Before any work: `out` may be absent or an empty folder; a non-empty one only with --force, and
    only a queue label-queue wrote (its MARKER inside): --force never replaces a folder of anything else,
    a photo folder least of all."""
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise SstlError(f"{out} exists and is not a folder: pass --out a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SstlError(
                f"{out}/ holds files label-queue did not write (no {MARKER}): it is never replaced, "
                "--force or not: pass --out a new folder"
            )
        if not force:
            raise SstlError(f"{out}/ holds an earlier queue: pass --force to replace it, or --out another folder")


def write_queue(out: Path, rows: list[dict[str, str]], sources: Sequence[Path], *, force: bool) -> None:
    """Copies and queue.csv written into a temp folder beside `out`, then renamed into place: a killed or
    failed run leaves the old queue (or none), never half of one."""
    check_output(out, force=force)
    with atomic_folder(out) as tmp:
        (tmp / IMAGES).mkdir()
        (tmp / MARKER).write_text("written by sstl label-queue: --force may replace this folder\n", encoding="utf-8")
        for row, source in zip(rows, sources, strict=True):
            shutil.copyfile(source, tmp / row["image"])  # the bytes, also when the pool holds symbolic links
        with (tmp / QUEUE_CSV).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=QUEUE_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


@dataclass
class QueueSummary:
    out: Path
    picked: int
    pool: int
    skipped: int


def label_queue(
    *,
    model_path: Path,
    folder: Path,
    out: Path,
    n: int,
    strategy: str,
    seed: int = 0,
    force: bool = False,
    tta: Tta = "none",
    runtime: Runtime,
) -> QueueSummary:
    """Score <folder>/unlabeled/ with the checkpoint, rank it by `strategy`, write the n best to `out`."""
    check_strategy(strategy)
    check_output(out, force=force)
    model, meta = load_checkpoint(model_path)
    files = pool_files(folder)
    size, interpolation = meta["image_size"], meta.get("interpolation") or model.data.interpolation
    scored = score_pool(model, files, size, interpolation=interpolation, runtime=runtime, tta=tta)
    features = feature_reader(model, scored.paths, size, interpolation=interpolation, runtime=runtime)
    picks = rank(scored.probs, strategy, n, features=features, seed=seed)
    rows = queue_rows(scored.paths, scored.probs, picks, strategy, meta["classes"], Path(folder) / "unlabeled")
    write_queue(out, rows, [scored.paths[i] for i in picks], force=force)
    return QueueSummary(out, len(rows), len(scored.paths), scored.skipped)
