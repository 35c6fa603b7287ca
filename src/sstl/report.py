"""Markdown for people: the metrics table, and what changed against a git revision (via DVC)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from sstl.errors import SstlError

COLUMNS = ("accuracy", "macro_f1", "ece")


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
        lines += ["", f"**Use: {health['use']}** (highest val accuracy: {val}; test is never used to choose)."]
        lines += [f"- left out: {s} (no images in this split)" for s in health.get("absent_splits", [])]
        lines += [f"- **WARNING**: {w}" for w in health.get("warnings", [])]
    return "\n".join(lines) + "\n"


def _dvc_json(args: list[str]) -> Any:
    try:
        out = subprocess.run(["dvc", *args, "--json"], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SstlError("dvc not found: install the project (`pip install -e .`) in this environment") from None
    except subprocess.CalledProcessError as err:
        last = (err.stderr.strip().splitlines() or ["no output"])[-1]
        raise SstlError(f"`dvc {' '.join(args)}` failed: {last}") from None
    return json.loads(out.stdout or "{}")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))


def diff_markdown(rev: str) -> str:
    """Metrics and params that differ between `rev` and the workspace, as markdown tables."""
    parts = []
    metrics = _dvc_json(["metrics", "diff", rev])
    rows = [(f, k, d) for f, per_file in metrics.items() for k, d in per_file.items()]
    parts.append(f"### Metrics: {rev} → workspace\n")
    if rows:
        parts.append("| file | metric | " + rev + " | workspace | change |\n|---|---|---|---|---|")
        for f, k, d in rows:
            parts.append(f"| {f} | {k} | {_fmt(d.get('old'))} | {_fmt(d.get('new'))} | {_fmt(d.get('diff'))} |")
    else:
        parts.append("No metric changed.")
    params = _dvc_json(["params", "diff", rev])
    changed = [(k, d) for per_file in params.values() for k, d in per_file.items()]
    parts.append(f"\n### Params: {rev} → workspace\n")
    if changed:
        parts.append("| param | " + rev + " | workspace |\n|---|---|---|")
        parts += [f"| {k} | {_fmt(d.get('old'))} | {_fmt(d.get('new'))} |" for k, d in changed]
    else:
        parts.append("No param changed.")
    return "\n".join(parts) + "\n"
