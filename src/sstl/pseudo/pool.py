"""Streaming selection over a pool larger than memory: shards, bounded accumulators and a resumable state."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sstl.config.pseudo import SelectConfig
from sstl.core.files import atomic_path
from sstl.models.classifier import Classifier, model_digest
from sstl.models.inference import batch_outputs
from sstl.pseudo.stream import Accumulator, Rows, Selection, Threshold, TopK
from sstl.runtime.device import Runtime
from sstl.runtime.distributed import world

STATE_VERSION = 3  # 2: the state keeps the held images' logits (soft pseudo-labels); 3: and the pool's prior


class PoolSelection(NamedTuple):
    selection: Selection  # (index (M,), label (M,), score (M,))
    logits: torch.Tensor  # (M, C) fp32: row i's are image index[i]'s
    prior: torch.Tensor  # (C,) fp32: the teacher's mean softmax over the whole pool


def accumulator(cfg: SelectConfig, num_classes: int) -> Accumulator:
    return TopK(num_classes, cfg.top_k, cfg.top_p) if cfg.method == "topk" else Threshold(cfg.threshold)


def state_file(state_dir: Path, rank: int, size: int) -> Path:
    return Path(state_dir) / f"rank{rank}-of-{size}.pt"


def load_state(path: Path, identity: str, acc: Accumulator, rows: Rows, prior: torch.Tensor) -> int:
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
        prior.copy_(state["prior"])
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
        tqdm.write(f"pseudolabel: ignoring unreadable {path} ({err})")
        return -1
    return int(state["last_shard"])


def save_state(path: Path, identity: str, last_shard: int, acc: Accumulator, rows: Rows, prior: torch.Tensor) -> None:
    """Atomically: a kill leaves the previous state or this one, never half a file."""
    state = {
        "version": STATE_VERSION,
        "identity": identity,
        "last_shard": last_shard,
        "accumulator": acc.state_dict(),
        "logits": rows.state_dict(),
        "prior": prior,
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
    runtime: Runtime,
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


def gather(
    acc: Accumulator, rows: Rows, prior: torch.Tensor, cfg: SelectConfig, num_classes: int
) -> tuple[Selection, Rows, torch.Tensor] | None:
    """Merge every process's accumulator, logits and prior sum on rank 0 (the same top-K merge); None on
    the other ranks."""
    rank, size = world()
    if size == 1:
        return acc.result(), rows, prior
    states: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object((acc.state_dict(), rows.state_dict(), prior), states, dst=0)
    if states is None:
        return None
    merged, merged_rows = accumulator(cfg, num_classes), Rows(num_classes)
    merged_prior = torch.zeros(num_classes, dtype=torch.float64)
    for acc_state, rows_state, part_prior in states:
        part, part_rows = accumulator(cfg, num_classes), Rows(num_classes)
        part.load_state_dict(acc_state)
        part_rows.load_state_dict(rows_state)
        merged.merge(part)
        merged_rows.merge(part_rows)
        merged_prior += part_prior
    return merged.result(), merged_rows, merged_prior


def select_pool(
    model: Classifier, images: np.ndarray | torch.Tensor, cfg: SelectConfig, num_classes: int, **options: Any
) -> Selection | None:
    """The selection of `select_pool_logits` (same options, same resume state), without the logits."""
    out = select_pool_logits(model, images, cfg, num_classes, **options)
    return None if out is None else out.selection


def select_pool_logits(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    cfg: SelectConfig,
    num_classes: int,
    *,
    state_dir: Path | None = None,
    pool_id: str = "",
    on_shard: Callable[[int], None] | None = None,
    runtime: Runtime,
) -> PoolSelection | None:
    """Score and select over uint8 (N, H, W, 3) `images` (a memory-mapped .npy is read shard by shard).

    Shard s = images [s * shard_size, (s + 1) * shard_size); rank r of W takes shards r, r + W, ...
    After each shard the state (accumulator, the held images' logits, last finished shard, run
    identity) is saved to `state_dir` and `on_shard(s)` is called; a re-run with the same identity
    continues after the last finished shard. Returns (selection (index, label, score), logits, prior):
    the selection as select_topk / select_threshold would make it from the softmax of all of `images`'
    logits; in row i the fp32 logits (C,) of image index[i], those the selection was made from
    (`cfg.tta` applies); and the teacher's mean softmax over every image of the pool (C,), its estimate
    of the pool's class prior. On rank 0 (the only process when not under torchrun); None on others.
    `pool_id` names the pool's content for the identity (e.g. the manifest's sha256).
    """
    rank, size = world()
    n = len(images)
    acc, rows = accumulator(cfg, num_classes), Rows(num_classes)
    prior = torch.zeros(num_classes, dtype=torch.float64)  # the softmax summed over every image scored
    path = state_file(state_dir, rank, size) if state_dir is not None else None
    identity = (
        run_identity(model, n, cfg, num_classes, pool_id=pool_id, rank=rank, size=size, runtime=runtime) if path else ""
    )
    last = load_state(path, identity, acc, rows, prior) if path else -1
    if last >= 0:
        tqdm.write(f"pseudolabel: rank {rank} resumes after shard {last} ({path})")
    else:  # nothing of an ignored state may leak in
        acc, rows = accumulator(cfg, num_classes), Rows(num_classes)
        prior.zero_()
    todo = [s for s in range(rank, math.ceil(n / cfg.shard_size), size) if s > last]
    for s in tqdm(todo, desc="pseudo-label", unit="shard", disable=None if rank == 0 else True):
        start, stop = s * cfg.shard_size, min((s + 1) * cfg.shard_size, n)
        shard = batch_outputs(
            model, images, runtime=runtime, batch_size=cfg.batch_size, start=start, stop=stop, tta=cfg.tta
        )
        for logits, index in shard:
            probs = logits.softmax(1)
            acc.update(probs, index)
            rows.add(logits, index)
            prior += probs.double().sum(0)
        rows.keep(acc.result()[0])  # only the images still held keep their logits: memory O(held x C)
        if path:
            save_state(path, identity, s, acc, rows, prior)
        if on_shard:
            on_shard(s)
    merged = gather(acc, rows, prior, cfg, num_classes)
    if merged is None:
        return None
    selection, kept, total = merged
    return PoolSelection(selection, kept.take(selection[0]), (total / max(n, 1)).float())
