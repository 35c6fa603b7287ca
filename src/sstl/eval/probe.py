"""The baseline every run must beat: the backbone, frozen, under a scikit-learn logistic regression fitted
on the teacher's labelled rows, its L2 strength C chosen by stratified k-fold cross-validation on those
rows alone (never val, never test).

The fitted regression becomes the linear head of an ordinary sstl Classifier, so the probe is saved,
evaluated, compared and served exactly like teacher and students: one code path scores them all.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from torch import nn

from sstl.core.errors import SstlError
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.runtime.device import Runtime


@dataclass(frozen=True)
class ProbeChoice:
    """What the cross-validation chose, and on what: the record evaluate and the model card show."""

    C: float
    folds: int  # 0: too few labels per class for cross-validation, C is the grid's middle value
    cv_accuracy: dict[float, float]  # mean accuracy over the folds, per C of the grid
    rows: int  # labelled rows the probe was fitted on: the teacher's

    def as_dict(self) -> dict[str, object]:
        return {
            "C": self.C,
            "folds": self.folds,
            "cv_accuracy": {f"{c:g}": round(a, 4) for c, a in self.cv_accuracy.items()},
            "rows": self.rows,
        }


def _regression(c: float, seed: int, max_iter: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=max_iter, random_state=seed)


def choose_c(
    features: np.ndarray, labels: np.ndarray, *, grid: Sequence[float], folds: int, seed: int, max_iter: int = 2000
) -> ProbeChoice:
    """C with the best mean stratified k-fold accuracy on (features, labels); ties go to the smaller C
    (the stronger prior). k is `folds`, or the smallest class's count when that is fewer (at least 2)."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    k = min(folds, smallest)
    grid = sorted(float(c) for c in grid)
    if k < 2:  # one labelled row in some class: nothing to cross-validate on
        return ProbeChoice(C=grid[len(grid) // 2], folds=0, cv_accuracy={}, rows=len(labels))
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores: dict[float, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a large C on separable rows: the fit is still used
        for c in grid:
            scores[c] = float(cross_val_score(_regression(c, seed, max_iter), features, labels, cv=split).mean())
    best = max(grid, key=lambda c: (round(scores[c], 9), -c))
    return ProbeChoice(C=best, folds=k, cv_accuracy=scores, rows=len(labels))


def fit_probe(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    grid: Sequence[float],
    folds: int,
    seed: int,
    runtime: Runtime,
    max_iter: int = 2000,
) -> ProbeChoice:
    """Give `model` (built with a linear head: head_layers 0) the probe's head: the frozen backbone's
    features of uint8 `images` (N, H, W, 3), C by cross-validation on them, the regression refitted on
    all N rows, its weights copied into the head's Linear. Returns the choice."""
    layers = list(model.head.children())
    linear = layers[-1] if layers else None
    if not isinstance(linear, nn.Linear) or any(isinstance(m, nn.Linear) for m in layers[:-1]):
        raise ValueError("the probe is a linear head: build its model with head_layers 0")
    y = labels.numpy()
    if len(np.unique(y)) < num_classes:
        missing = sorted(set(range(num_classes)) - set(y.tolist()))
        raise SstlError(f"the probe needs a labelled photo of every class; class indices {missing} have none")
    raw = infer(model, images, runtime=runtime, desc="probe features", features=True).double().numpy()
    # centred and divided by one global scale: C then means the same whatever the backbone's feature scale
    # (a randomly initialised one can give features 1e-5 apart), and the geometry between features is kept
    mean = raw.mean(0)
    scale = float(np.sqrt(((raw - mean) ** 2).mean())) or 1.0
    x = (raw - mean) / scale
    choice = choose_c(x, y, grid=grid, folds=folds, seed=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = _regression(choice.C, seed, max_iter).fit(x, y)
    coef = fitted.coef_ / scale  # w.(f - mean)/scale + b = (w/scale).f + (b - (w/scale).mean)
    bias = fitted.intercept_ - coef @ mean
    if num_classes == 2:  # scikit-learn keeps one row for two classes: logit(1) - logit(0) = w.x + b
        coef, bias = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef).float())
        linear.bias.copy_(torch.from_numpy(bias).float())
    return choice
