"""Classify image files with a trained checkpoint: top-k classes and probabilities per image."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstl.config.runtime import Tta
from sstl.core.errors import SstlError
from sstl.data.images import IMAGE_SUFFIXES, UnreadableImage, decode, read_file, walk
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.runtime.device import Runtime


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded (recursively, hidden entries left out) to their image files, sorted.

    Entries that exist but cannot be read (a broken link, a FIFO) are kept: predict reports and skips
    them by name. Only a path that does not exist at all is an error (most likely a typo)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p, _ in walk(path) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif os.path.lexists(path):
            found.append(path)
        else:
            raise SstlError(f"{path} not found: pass image files or folders")
    if not found:
        raise SstlError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}")
    return found


def predict(
    model: Classifier,
    classes: list[str],
    image_size: int,
    paths: list[Path],
    top_k: int,
    *,
    interpolation: str | None = None,
    runtime: Runtime,
    on_skip: Callable[[Path, str], None] | None = None,
    tta: Tta = "none",
) -> list[dict[str, Any]]:
    """One row per readable image: {"path", "predictions": [{"class", "probability"}, ...]} best first.

    Each image is decoded as `prepare` packed the training images: side `image_size`, resampled with
    `interpolation` (default: the backbone's); the model normalises with its own mean and std.
    `tta`: test-time augmentation as in evaluate (`evaluate.tta`: the probabilities are the softmax of
    the averaged logits).
    An unreadable image does not cost the batch: `on_skip(path, reason)` is told (default: one line on
    stderr) and the others are classified; only when none can be read is it an error."""
    images, readable, problems = [], [], []
    for path in paths:
        try:
            images.append(decode(read_file(path), image_size, interpolation or model.data.interpolation))
            readable.append(path)
        except UnreadableImage as err:
            problems.append((path, str(err)))
    if not readable:
        first, reason = problems[0]
        which = f"none of the {len(problems)} images could be read, e.g. " if len(problems) > 1 else ""
        raise SstlError(f"{which}{first}: {reason}; pass readable image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path, reason in problems:
        (on_skip or report_skip)(path, reason)
    probs = infer(model, torch.from_numpy(np.stack(images)), runtime=runtime, desc="predict", tta=tta).softmax(1)
    score, index = probs.topk(min(top_k, len(classes)), dim=1)
    return [
        {
            "path": str(p),
            "predictions": [{"class": classes[c], "probability": round(s, 4)} for c, s in zip(ci, si, strict=True)],
        }
        for p, ci, si in zip(readable, index.tolist(), score.tolist(), strict=True)
    ]


def report_skip(path: Path, reason: str) -> None:
    """One line on stderr: stdout stays the table / csv / json of the images that were classified."""
    print(f"skipped {path}: {reason}", file=sys.stderr)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """rows -> text as `table` (aligned), `csv` (path, rank, class, probability) or `json`."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = [
        {"path": r["path"], "rank": k + 1, "class": p["class"], "probability": p["probability"]}
        for r in rows
        for k, p in enumerate(r["predictions"])
    ]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["path", "rank", "class", "probability"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buf.getvalue()
    k = len(rows[0]["predictions"])
    header = ["path"] + [f"top{i + 1}" for i in range(k)]
    body = [[r["path"]] + [f"{p['class']} ({p['probability']:.3f})" for p in r["predictions"]] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    )
