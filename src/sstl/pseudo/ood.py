"""Unlabelled photos of no class: a pool image is out of distribution when its nearest labelled photo,
by cosine similarity of the teacher's pooled features, is further than the nearest labelled photo of
almost every val photo (deep nearest neighbours: Sun et al., ICML 2022).

The threshold is calibrated on val, which holds in-distribution photos the teacher did not train on:
keep a pool image when its similarity reaches the `quantile` of val's (0.05: 95% of val would pass).
Without val, each labelled photo's nearest other labelled photo stands in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_similarity(queries: torch.Tensor, bank: torch.Tensor, *, exclude_self: bool = False) -> torch.Tensor:
    """(Q, D), (B, D) features -> (Q,) the cosine similarity of each query to its nearest bank row;
    `exclude_self`: queries are the bank itself, and a row is not its own neighbour."""
    q, b = F.normalize(queries.double(), dim=1), F.normalize(bank.double(), dim=1)
    sims = []
    for start in range(0, len(q), 4096):  # (4096, B) at a time: a large pool never makes a (Q, B) matrix
        block = q[start : start + 4096] @ b.T
        if exclude_self:
            block[torch.arange(len(block)), torch.arange(start, start + len(block))] = -2.0
        sims.append(block.max(1).values)
    return torch.cat(sims) if sims else torch.zeros(0, dtype=torch.float64)


def threshold(labelled: torch.Tensor, val: torch.Tensor, quantile: float) -> float:
    """The similarity a pool image must reach: val's nearest-labelled similarities at `quantile`
    (labelled rows against the others when val is empty)."""
    calib = nearest_similarity(val, labelled) if len(val) else nearest_similarity(labelled, labelled, exclude_self=True)
    return float(torch.quantile(calib, quantile))


def in_distribution(
    pool: torch.Tensor, labelled: torch.Tensor, val: torch.Tensor, *, quantile: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(keep (P,) bool, similarity (P,), threshold) for pool features against the labelled ones, all
    centred on the labelled features' mean first: pooled post-ReLU features are all positive, and
    without centring every pair of them is similar."""
    centre = labelled.double().mean(0) if len(labelled) else 0.0
    pool, labelled, val = pool.double() - centre, labelled.double() - centre, val.double() - centre
    cut = threshold(labelled, val, quantile)
    sims = nearest_similarity(pool, labelled)
    return sims >= cut, sims, cut
