"""Pseudo-labels: the teacher's softmax over the unlabelled pool, then a selection rule.

`threshold`: keep images whose top probability is >= tau.
`topk` (Yalniz et al. 2019): keep each image's top-P classes, then per class the K images with the
highest probability for it: a balanced set even when the teacher favours some classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from sstl.models import Classifier
from sstl.transforms import normalize


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["topk", "threshold"] = "topk"
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="tau for method=threshold")
    top_k: int = Field(100, ge=1, description="K images per class for method=topk")
    top_p: int = Field(1, ge=1, description="P classes per image for method=topk")
    batch_size: int = Field(256, ge=1)


@torch.inference_mode()
def infer(model: Classifier, images: torch.Tensor, batch_size: int = 256, desc: str = "infer") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> logits float32 (N, C)."""
    model.eval()
    chunks = images.split(batch_size)
    return torch.cat([model(normalize(c)) for c in tqdm(chunks, desc=desc, unit="batch", disable=None)])


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
