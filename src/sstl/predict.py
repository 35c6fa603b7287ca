"""Classify image files with a trained checkpoint: top-k classes and probabilities per image."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstl.errors import SstlError
from sstl.images import IMAGE_SUFFIXES, UnreadableImage, decode
from sstl.inference import infer
from sstl.models import Classifier
from sstl.runtime import CPU, Runtime


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded (recursively) to their image files, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
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
    runtime: Runtime = CPU,
) -> list[dict[str, Any]]:
    """One row per image: {"path", "predictions": [{"class", "probability"}, ...]} best first.

    Each image is decoded as `prepare` packed the training images: side `image_size`, resampled with
    `interpolation` (default: the backbone's); the model normalises with its own mean and std."""
    images = []
    for path in paths:
        try:
            images.append(decode(path.read_bytes(), image_size, interpolation or model.data.interpolation))
        except UnreadableImage as err:
            raise SstlError(f"{path}: {err}; remove it or pass only image files") from None
    probs = infer(model, torch.from_numpy(np.stack(images)), runtime=runtime, desc="predict").softmax(1)
    score, index = probs.topk(min(top_k, len(classes)), dim=1)
    return [
        {
            "path": str(p),
            "predictions": [{"class": classes[c], "probability": round(s, 4)} for c, s in zip(ci, si, strict=True)],
        }
        for p, ci, si in zip(paths, index.tolist(), score.tolist(), strict=True)
    ]


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
