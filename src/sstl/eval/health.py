"""Runs that go wrong quietly, made loud: a collapsed model, a pretext at chance, a student below its
teacher, a model to use that does not beat the frozen-feature baseline. Which model to use is chosen on
val, never test (with `data.refit`, by rule: the last model, for val is in its training); the baseline
check also reports test and test-add, for it changes no choice.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sstl.eval.report import RULE as RULE  # `recommend`'s, in words: the summary's default

COLLAPSE_SHARE = 0.9  # one class taking >= 90% of val predictions, where the truth is far more even
ORDER = ("teacher", "student", "finetuned")  # one round; each should do at least as well on val as the one before
SPLITS = ("val", "test", "test-add")
ALPHA = 0.05  # a model is beaten on val when the sign test says so at this level
REFIT_RULE = "data.refit: the fine-tuned student, trained on every label; val is in its training and cannot judge it"


def collapse(predictions: Sequence[int], labels: torch.Tensor, classes: Sequence[str]) -> str | None:
    """The warning for a model that predicts (nearly) one class on val, or None."""
    if len(predictions) == 0 or len(classes) < 2:
        return None
    counts = torch.bincount(torch.as_tensor(predictions), minlength=len(classes))
    top = int(counts.argmax())
    share = float(counts[top]) / len(predictions)
    truth = float(torch.bincount(labels, minlength=len(classes)).max()) / max(len(labels), 1)
    if share >= COLLAPSE_SHARE and share - truth >= 0.25:
        return f"collapsed: {share:.0%} of val predictions are '{classes[top]}' (its true share is at most {truth:.0%})"
    return None


def at_chance(accuracy: float, num_classes: int, *, margin: float = 0.05) -> str | None:
    """The warning for an accuracy within `margin` of guessing among `num_classes`, or None."""
    chance = 1.0 / num_classes
    if accuracy <= chance + margin:
        return f"at chance: val accuracy {accuracy:.3f} against {chance:.3f} for guessing among {num_classes}"
    return None


def check_models(
    val_accuracy: Mapping[str, float], collapses: Mapping[str, str | None], *, order: Sequence[str] = ORDER
) -> list[str]:
    """Warnings over the pipeline's models: collapses, and a model below the one it was built from
    (`order`: the pipeline's, e.g. teacher, each round's student, finetuned)."""
    warnings = [f"{name}: {msg}" for name, msg in collapses.items() if msg]
    present = [m for m in order if m in val_accuracy]
    for before, after in zip(present, present[1:], strict=False):
        if val_accuracy[after] < val_accuracy[before]:
            warnings.append(f"{after} below {before} on val: {val_accuracy[after]:.4f} < {val_accuracy[before]:.4f}")
    return warnings


def below_baseline(
    accuracy: Mapping[str, Mapping[str, float]], use: str, probes: Sequence[str], *, splits: Sequence[str] = SPLITS
) -> list[str]:
    """One warning per split where `use` is not above the best probe ({model: {split: accuracy}}): the
    semi-supervised pipeline then ships nothing a logistic regression on frozen features does not."""
    warnings = []
    for split in splits:
        rivals = {p: accuracy[p][split] for p in probes if split in accuracy.get(p, {})}
        if not rivals or split not in accuracy.get(use, {}):
            continue
        best = max(rivals, key=lambda p: rivals[p])
        if accuracy[use][split] <= rivals[best]:
            warnings.append(
                f"{use}, the model to use, is not above the frozen-feature baseline {best} on {split}: "
                f"{accuracy[use][split]:.4f} <= {rivals[best]:.4f} (the unlabelled photos and the training bought "
                "nothing a logistic regression on frozen features does not: docs/photos.md)"
            )
    return warnings


def beaten_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """How likely A does at least this much better than B by chance: on the photos exactly one of them
    gets right (a[i], b[i]: right or not), the exact one-sided sign test (McNemar's) of A's share."""
    wins = sum(x and not y for x, y in zip(a, b, strict=True))
    n = wins + sum(y and not x for x, y in zip(a, b, strict=True))
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def recommend(val_correct: Mapping[str, Sequence[bool]], *, order: Sequence[str] = ORDER, alpha: float = ALPHA) -> str:
    """The model to use, chosen on val (which photos each model gets right): the latest model of `order`
    that no other model beats beyond chance (`beaten_p` < alpha).

    The later models are built to be better (the pipeline's goal), and a val set of a few dozen photos
    cannot tell models a few points apart: on 50 photos, 43 right against 39 is p = 0.19 when the two
    disagree on 12. A model clearly worse on val is never used. Where every model is beaten by some
    other, the highest val accuracy (ties: the later)."""
    if not val_correct:
        return order[-1]
    rank = {m: i for i, m in enumerate(order)}
    names = sorted(val_correct, key=lambda m: rank.get(m, -1), reverse=True)  # latest first
    for m in names:
        if all(beaten_p(val_correct[o], val_correct[m]) >= alpha for o in names if o != m):
            return m
    accuracy = {m: sum(c) / max(len(c), 1) for m, c in val_correct.items()}
    return max(names, key=lambda m: (round(accuracy[m], 6), rank.get(m, -1)))


def model_to_use(health: Path, models: Path = Path("models")) -> Path:
    """The checkpoint of the model to use, as evaluate chose it (health.json's `use`): the one rule that
    the summary, the model card, the registry and `sstl predict` follow. The fine-tuned student where
    evaluate has not run yet."""
    use = json.loads(health.read_text(encoding="utf-8")).get("use") if health.is_file() else None
    return models / f"{use or ORDER[-1]}.pt"


def warn(stage: str, messages: Sequence[str]) -> None:
    """Loud, on stderr, one line each: DVC shows it, the run still writes its outputs."""
    for msg in messages:
        print(f"WARNING [{stage}]: {msg}", file=sys.stderr)
