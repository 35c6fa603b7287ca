"""Pseudo-labels: the teacher's softmax over the unlabelled pool, then a selection rule.

`threshold`: keep images whose top probability is >= tau.
`topk` (Yalniz et al. 2019): keep each image's top-P classes, then per class the K images with the
highest probability for it: a balanced set even when the teacher favours some classes.

`select_topk` / `select_threshold` work on all probabilities in memory (the reference);
`select_pool` streams a pool of any size: shards of `shard_size` images read from the memory-mapped
array, fed to the bounded accumulators of `sstl.pseudo.stream`, the state saved after each shard so that
a killed run resumes, and the shards dealt round-robin to torchrun processes (see docs/pipeline.md).

Soft pseudo-labels: beside the accumulator, the logits of the images it still holds are kept
(`sstl.pseudo.stream.Rows`, in the resume state too), so `select_pool_logits` gives each selected image's
whole distribution from the same single pass over the pool; `soft_targets(logits, temperature)` =
softmax(logits / temperature). The selection itself always uses the plain softmax (temperature 1).
"""

from __future__ import annotations

import torch


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


def balance_to_prior(label: torch.Tensor, score: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Positions (K,) into a selection's (label (M,), score (M,)) to keep, each class's most confident
    first, so that the kept classes' shares are the `prior`'s (C,) among the classes selected at all.

    The confident set of a teacher is skewed towards its easy classes; kept as it is, it teaches the
    student that skew. The kept size is the largest the rarest selected class allows relative to its
    prior (M* = min_c n_c / p_c), so every class keeps round(p_c M*) of its n_c rows. A class the
    selection holds no row of is left out of the constraint (it cannot be made up)."""
    num_classes = len(prior)
    counts = torch.bincount(label, minlength=num_classes).double()
    share = prior.double() / prior.double().sum()
    present = (counts > 0) & (share > 0)
    if not present.any():
        return torch.zeros(0, dtype=torch.int64)
    total = float((counts[present] / share[present]).min())
    quota = torch.minimum(counts, (share * total).round()).long()
    keep = []
    for c in range(num_classes):
        rows = torch.nonzero(label == c).flatten()
        best = rows[score[rows].argsort(descending=True, stable=True)][: int(quota[c])]
        keep.append(best)
    return torch.cat(keep).sort().values


def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits (M, C) -> float32 softmax(logits / temperature): the soft pseudo-labels, rows summing to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (logits.float() / temperature).softmax(1)
