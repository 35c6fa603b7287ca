"""Markdown for people: the metrics table of `evaluate` (reports/summary.md, `sstl report`, `sstl status`).

The pull request's review and the experiments table are `sstl.review`, kept apart so that changing
them does not re-run `evaluate` (which imports this module)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("accuracy", "macro_f1", "ece")
RULE = "the latest model no other beats on val beyond chance, sign test p < 0.05"  # sstl.eval.health.recommend


def summary_markdown(metrics: dict[str, dict[str, dict[str, float]]], health: dict[str, Any] | None = None) -> str:
    """{model: {split: {metric: value}}} -> a markdown table, one row per model; with evaluate's
    `health` verdict: the model to use (chosen on val), its warnings and the splits left out."""
    splits = sorted({s for per_split in metrics.values() for s in per_split}, key=lambda s: (s != "test", s))
    head = ["model"] + [f"{s} {c}" for s in splits for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, per_split in metrics.items():
        cells = [f"{per_split.get(s, {}).get(c, float('nan')):.4f}" for s in splits for c in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if health:
        val = ", ".join(f"{m} {a:.4f}" for m, a in health.get("val_accuracy", {}).items())
        rule = health.get("rule", RULE)
        lines += ["", f"**Use: {health['use']}** ({rule}; val accuracy: {val}; test is never used to choose)."]
        lines += [f"- baseline: {baseline_line(name, b)}" for name, b in health.get("baseline", {}).items()]
        lines += [f"- left out: {s} (no images in this split)" for s in health.get("absent_splits", [])]
        lines += [f"- **WARNING**: {w}" for w in health.get("warnings", [])]
    return "\n".join(lines) + "\n"


def baseline_line(name: str, probe: dict[str, Any]) -> str:
    """One probe of health.json's `baseline`, in words: what it is and how its C was chosen."""
    how = (
        f"by {probe['folds']}-fold cross-validation"
        if probe.get("folds")
        else "fixed (too few labels to cross-validate)"
    )
    splits = " + ".join(probe.get("splits", ["labeled"]))
    return (
        f"{name} = frozen {probe['arch']} (weights: {probe['weights']}) + logistic regression on "
        f"{probe['rows']} labelled rows ({splits}), C={probe['C']:g} {how}; val accuracy "
        f"{probe.get('val_accuracy', float('nan')):.4f}"
    )
