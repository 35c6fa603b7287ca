"""Pseudo-labels: the teacher's softmax over the unlabelled pool, then a selection rule.

`threshold`: keep images whose top probability is >= tau.
`topk` (Yalniz et al. 2019): keep each image's top-P classes, then per class the K images with the
highest probability for it: a balanced set even when the teacher favours some classes.

`select_topk` / `select_threshold` work on all probabilities in memory (the reference);
`select_pool` streams a pool of any size: shards of `shard_size` images read from the memory-mapped
array, fed to the bounded accumulators of `sstl.stream`, the state saved after each shard so that
a killed run resumes, and the shards dealt round-robin to torchrun processes (see README).

Soft pseudo-labels: beside the accumulator, the logits of the images it still holds are kept
(`sstl.stream.Rows`, in the resume state too), so `select_pool_logits` gives each selected image's
whole distribution from the same single pass over the pool; `soft_targets(logits, temperature)` =
softmax(logits / temperature). The selection itself always uses the plain softmax (temperature 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from sstl.files import atomic_path
from sstl.inference import TTA_HELP, Tta, batch_outputs
from sstl.models import Classifier, model_digest
from sstl.runtime import CPU, Runtime, world
from sstl.stream import Accumulator, Rows, Selection, Threshold, TopK

STATE_VERSION = 2  # 2: the state keeps the held images' logits (soft pseudo-labels)


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["topk", "threshold"] = "topk"
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="tau for method=threshold")
    top_k: int = Field(100, ge=1, description="K images per class for method=topk")
    top_p: int = Field(1, ge=1, description="P classes per image for method=topk")
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(
        8192, ge=1, description="images per shard: the unit of resume (state saved after each) and of work per process"
    )
    tta: Tta = Field("none", description=TTA_HELP)
    temperature: float = Field(
        1.0, gt=0.0, description="softmax temperature of the soft targets (pseudo_files().probs); not of the selection"
    )


class PseudoFiles(NamedTuple):
    """One teacher's pseudo-labels: the pseudolabel stage writes them, its round's student reads them."""

    labels: Path  # the selected rows: index, path, label, label_index, score
    probs: Path  # float32 (rows, classes): row i's soft label, softmax(logits / temperature)
    counts: Path  # pseudo-labels per class
    summary: Path  # pool size, selected, mean score
    state: Path  # the streaming selection's resume state: git-ignored, not a DVC output


def pseudo_files(teacher: str) -> PseudoFiles:
    """Where the pseudo-labels of model `teacher` (models/<teacher>.pt) go: one set per round."""
    return PseudoFiles(
        Path(f"data/pseudolabels/{teacher}.csv"),
        Path(f"data/pseudolabels/{teacher}.npy"),
        Path(f"reports/pseudolabel/{teacher}/counts.csv"),
        Path(f"reports/pseudolabel/{teacher}/summary.json"),
        Path(f".sstl-state/pseudolabel/{teacher}"),
    )


def select_threshold(probs: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs (N, C) -> (index (M,), label (M,), score (M,)) of images with max prob >= tau."""
    score, label = probs.max(dim=1)
    index = torch.nonzero(score >= tau).flatten()
    return index, label[index], score[index]


def select_topk(probs: torch.Tensor, k: int, p: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs (N, C) -> (index, label, score), at most k per class, ordered by class then score.

    An image competes only for its own top-p classes, so with p > 1 it may be chosen for several.
    """
    n, c = probs.shape
    top_classes = probs.topk(min(p, c), dim=1).indices  # (N, P)
    eligible = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_classes, True)
    scores = probs.masked_fill(~eligible, -1.0)  # (N, C); -1 marks "not a candidate"
    score, index = scores.topk(min(k, n), dim=0)  # (K, C), sorted high to low per class
    label = torch.arange(c).expand_as(index)
    keep = score >= 0
    # column-major flattening: class 0's picks first, each class best-first
    return index.T[keep.T], label.T[keep.T], score.T[keep.T]


# --- streaming over a pool larger than memory -------------------------------------------------


def accumulator(cfg: SelectConfig, num_classes: int) -> Accumulator:
    return TopK(num_classes, cfg.top_k, cfg.top_p) if cfg.method == "topk" else Threshold(cfg.threshold)


def file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_file(state_dir: Path, rank: int, size: int) -> Path:
    return Path(state_dir) / f"rank{rank}-of-{size}.pt"


def load_state(path: Path, identity: str, acc: Accumulator, rows: Rows) -> int:
    """Restore `acc` and `rows` from a state of the same run; returns its last finished shard.

    -1: start afresh (no state, another run's, or unreadable); `acc` and `rows` may then hold part
    of the ignored state, so the caller starts from new ones."""
    if not path.is_file():
        return -1
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("identity") != identity:
            tqdm.write(f"pseudolabel: ignoring {path} (another run: model, pool or params differ)")
            return -1
        acc.load_state_dict(state["accumulator"])
        rows.load_state_dict(state["logits"])
        rows.take(acc.result()[0])  # KeyError unless every image held has its logits
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
        tqdm.write(f"pseudolabel: ignoring unreadable {path} ({err})")
        return -1
    return int(state["last_shard"])


def save_state(path: Path, identity: str, last_shard: int, acc: Accumulator, rows: Rows) -> None:
    """Atomically: a kill leaves the previous state or this one, never half a file."""
    state = {
        "version": STATE_VERSION,
        "identity": identity,
        "last_shard": last_shard,
        "accumulator": acc.state_dict(),
        "logits": rows.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def clear_state(state_dir: Path | None) -> None:
    """Remove the saved states (after the outputs are written), and their parent if left empty."""
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
        with suppress(OSError):
            Path(state_dir).parent.rmdir()


def run_identity(
    model: Classifier,
    n: int,
    cfg: SelectConfig,
    num_classes: int,
    *,
    pool_id: str,
    rank: int,
    size: int,
    runtime: Runtime = CPU,
) -> str:
    """What a saved state must match to be resumed: model weights, pool, params, process layout."""
    fields = {
        "version": STATE_VERSION,
        "model": model_digest(model),
        "pool_size": n,
        "pool_id": pool_id,
        "num_classes": num_classes,
        # the temperature only shapes the soft targets, made from the logits the state keeps: no restart
        "select": cfg.model_dump(exclude={"temperature"}),
        "rank": rank,
        "world_size": size,
        # bf16 and GPU scores differ in the last bits: never mix them with fp32 CPU ones
        "precision": runtime.precision,
        "device": runtime.device.type,
    }
    return json.dumps(fields, sort_keys=True)


def gather(acc: Accumulator, rows: Rows, cfg: SelectConfig, num_classes: int) -> tuple[Selection, Rows] | None:
    """Merge every process's accumulator and logits on rank 0 (the same top-K merge); None on the other ranks."""
    rank, size = world()
    if size == 1:
        return acc.result(), rows
    states: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object((acc.state_dict(), rows.state_dict()), states, dst=0)
    if states is None:
        return None
    merged, merged_rows = accumulator(cfg, num_classes), Rows(num_classes)
    for acc_state, rows_state in states:
        part, part_rows = accumulator(cfg, num_classes), Rows(num_classes)
        part.load_state_dict(acc_state)
        part_rows.load_state_dict(rows_state)
        merged.merge(part)
        merged_rows.merge(part_rows)
    return merged.result(), merged_rows


def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits (M, C) -> float32 softmax(logits / temperature): the soft pseudo-labels, rows summing to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (logits.float() / temperature).softmax(1)


def select_pool(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    cfg: SelectConfig,
    num_classes: int,
    *,
    state_dir: Path | None = None,
    pool_id: str = "",
    on_shard: Callable[[int], None] | None = None,
    runtime: Runtime = CPU,
) -> Selection | None:
    """The selection of `select_pool_logits` (same arguments, same resume state), without the logits."""
    out = select_pool_logits(
        model, images, cfg, num_classes, state_dir=state_dir, pool_id=pool_id, on_shard=on_shard, runtime=runtime
    )
    return None if out is None else out[0]


def select_pool_logits(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    cfg: SelectConfig,
    num_classes: int,
    *,
    state_dir: Path | None = None,
    pool_id: str = "",
    on_shard: Callable[[int], None] | None = None,
    runtime: Runtime = CPU,
) -> tuple[Selection, torch.Tensor] | None:
    """Score and select over uint8 (N, H, W, 3) `images` (a memory-mapped .npy is read shard by shard).

    Shard s = images [s * shard_size, (s + 1) * shard_size); rank r of W takes shards r, r + W, ...
    After each shard the state (accumulator, the held images' logits, last finished shard, run
    identity) is saved to `state_dir` and `on_shard(s)` is called; a re-run with the same identity
    continues after the last finished shard. Returns ((index, label, score), logits): the selection
    as select_topk / select_threshold would make it from the softmax of all of `images`' logits, and
    in row i the fp32 logits (C,) of image index[i], those the selection was made from (`cfg.tta`
    applies), on rank 0 (the only process when not under torchrun); None on other ranks.
    `pool_id` names the pool's content for the identity (e.g. the manifest's sha256).
    """
    rank, size = world()
    n = len(images)
    acc, rows = accumulator(cfg, num_classes), Rows(num_classes)
    path = state_file(state_dir, rank, size) if state_dir is not None else None
    identity = (
        run_identity(model, n, cfg, num_classes, pool_id=pool_id, rank=rank, size=size, runtime=runtime) if path else ""
    )
    last = load_state(path, identity, acc, rows) if path else -1
    if last >= 0:
        tqdm.write(f"pseudolabel: rank {rank} resumes after shard {last} ({path})")
    else:  # nothing of an ignored state may leak in
        acc, rows = accumulator(cfg, num_classes), Rows(num_classes)
    todo = [s for s in range(rank, math.ceil(n / cfg.shard_size), size) if s > last]
    for s in tqdm(todo, desc="pseudo-label", unit="shard", disable=None if rank == 0 else True):
        start, stop = s * cfg.shard_size, min((s + 1) * cfg.shard_size, n)
        shard = batch_outputs(
            model, images, runtime=runtime, batch_size=cfg.batch_size, start=start, stop=stop, tta=cfg.tta
        )
        for logits, index in shard:
            acc.update(logits.softmax(1), index)
            rows.add(logits, index)
        rows.keep(acc.result()[0])  # only the images still held keep their logits: memory O(held x C)
        if path:
            save_state(path, identity, s, acc, rows)
        if on_shard:
            on_shard(s)
    merged = gather(acc, rows, cfg, num_classes)
    if merged is None:
        return None
    selection, kept = merged
    return selection, kept.take(selection[0])
