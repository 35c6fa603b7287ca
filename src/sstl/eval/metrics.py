"""Classification metrics from logits: accuracy, macro-F1, per-class accuracy, confusion, ECE."""

from __future__ import annotations

from typing import Any

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(cm: torch.Tensor) -> float:
    """Mean over classes present in truth or prediction of 2PR/(P+R)."""
    tp = cm.diag().float()
    fp = cm.sum(0).float() - tp
    fn = cm.sum(1).float() - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return f1[present].mean().item() if present.any() else 0.0


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| x bin share."""
    conf, pred = probs.max(1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)  # bin b holds conf in [edges[b], edges[b+1])
    ece = torch.zeros(())
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.float().mean() * (correct[mask].mean() - conf[mask].mean()).abs()
    return ece.item()


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> list[dict[str, Any]]:
    """The bins `expected_calibration_error` sums over (same edges, same half-open [lower, upper) intervals,
    1.0 in the last), each with its count, mean confidence and accuracy (None when empty), so a reliability
    table shows where the ECE beside it comes from: ECE = sum of count / N x |accuracy - confidence|."""
    conf, pred = probs.max(1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    rows = []
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        rows.append(
            {
                "lower": edges[b].item(),
                "upper": edges[b + 1].item(),
                "count": count,
                "confidence": conf[mask].mean().item() if count else None,
                "accuracy": correct[mask].mean().item() if count else None,
            }
        )
    return rows


def classification_report(logits: torch.Tensor, target: torch.Tensor, num_classes: int, bins: int = 15) -> dict:
    """Everything evaluate writes for one model on one split."""
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    cm = confusion_matrix(pred, target, num_classes)
    support = cm.sum(1)
    per_class = (cm.diag().float() / support.clamp(min=1)).tolist()
    return {
        "accuracy": (pred == target).float().mean().item(),
        "macro_f1": macro_f1(cm),
        "ece": expected_calibration_error(probs, target, bins),
        "per_class_accuracy": per_class,
        "confusion": cm.tolist(),
        "predictions": pred.tolist(),
        "reliability": reliability_bins(probs, target, bins),  # for reports/model_card.md
    }
