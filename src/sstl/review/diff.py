"""A pull request's review (metrics, params and plots against a git revision, via DVC) and a narrow
experiments table that fits a terminal (`sstl report --rev`, `sstl exp show`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sstl.eval.report import COLUMNS
from sstl.review.dvc import dvc_json
from sstl.review.layout import LABELS, METRICS_FILE, MISSING, SPLITS, cell, model_order, order_key
from sstl.review.plots import render_plots

ABSENT = ("deleted", "not in cache")  # a file that is not here: nothing says it is out of date


def stale_stages(status: dict[str, Any]) -> tuple[dict[str, list[Any]], int]:
    """`dvc status --json` -> (stage -> its changes with absent files left out, the number left out).

    What remains is what makes dvc.lock not this tree's: a changed command, code, params or data."""
    stale: dict[str, list[Any]] = {}
    absent = 0
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else [changes]:
            if isinstance(change, dict):
                for kind, paths in change.items():
                    kept = {p: s for p, s in paths.items() if s not in ABSENT} if isinstance(paths, dict) else paths
                    absent += len(paths) - len(kept) if isinstance(paths, dict) else 0
                    if kept:
                        stale.setdefault(stage, []).append({kind: kept})
            else:
                stale.setdefault(stage, []).append(change)
    return stale, absent


def metric_rows(diff: dict[str, Any]) -> dict[tuple[str, str], dict[str, tuple[Any, Any]]]:
    """`dvc metrics diff --all --json` -> {(model, split): {metric: (old, new)}} from the metrics
    file, in the fixed order (teacher, student, finetuned; test, test-add)."""
    rows: dict[tuple[str, str], dict[str, tuple[Any, Any]]] = {}
    for key, change in diff.get(METRICS_FILE, {}).items():
        parts = key.split(".")
        if len(parts) == 3:
            model, split, metric = parts
            rows.setdefault((model, split), {})[metric] = (change.get("old"), change.get("new"))
    return dict(sorted(rows.items(), key=lambda kv: (model_order(kv[0][0]), order_key(kv[0][1], SPLITS))))


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else MISSING


def _change(old: Any, new: Any) -> str:
    """new - old with its sign (computed here, not DVC's `diff`, so an added metric shows as —)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new)):
        return MISSING
    return f"{new - old:+.4f}"


def metrics_table(rows: dict[tuple[str, str], dict[str, tuple[Any, Any]]]) -> list[str]:
    """Markdown rows: model, split, then old / new / change of each of COLUMNS present."""
    metrics = [c for c in COLUMNS if any(c in r for r in rows.values())]
    head = ["model", "split"] + [f"{LABELS[m]} {w}" for m in metrics for w in ("old", "new", "change")]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for (model, split), values in rows.items():
        cells = [model, split]
        for m in metrics:
            old, new = values.get(m, (None, None))
            cells += [_num(old), _num(new), _change(old, new)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def params_table(diff: dict[str, Any], rev: str) -> list[str]:
    """`dvc params diff --json` -> markdown rows `param | old | new`, sorted by name; [] when none changed."""
    changed = sorted(
        (f"{name}" if path == "params.yaml" else f"{path}:{name}", d)
        for path, per_file in diff.items()
        for name, d in per_file.items()
    )
    if not changed:
        return []
    lines = [f"| param | old (`{rev}`) | new |", "|---|---|---|"]
    return lines + [f"| `{k}` | {cell(d.get('old'))} | {cell(d.get('new'))} |" for k, d in changed]


def review_markdown(rev: str, *, plots: Path | None = None, relative_to: Path | None = None) -> str:
    """The pull request comment: accuracy / macro-F1 / ECE per model and split (old, new, change), the
    params that changed, and with `plots` the DVC plots old vs new as PNG files written there, linked
    relative to `relative_to` (the markdown file's folder; default: the current one)."""
    parts = [f"## sstl: `{rev}` → this branch", ""]
    rows = metric_rows(dvc_json(["metrics", "diff", rev, "--all"]))
    parts.append(f"### Metrics (`{METRICS_FILE}`; old = `{rev}`, new = this branch; ECE: lower is better)")
    parts.append("")
    parts += metrics_table(rows) if rows else [f"No metrics in {METRICS_FILE} at either revision."]
    params = params_table(dvc_json(["params", "diff", rev]), rev)
    parts += ["", "### Params changed", ""] + (params or ["No param changed."])
    if plots is not None:
        images = render_plots(dvc_json(["plots", "diff", rev]).get("data", {}), plots, old=rev)
        base = Path(relative_to) if relative_to is not None else Path.cwd()
        parts += ["", f"### Plots (`{rev}` vs this branch)", ""]
        parts += [
            f"![{title}]({Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()})" for title, path in images
        ]
        parts += [] if images else ["No plots."]
    return "\n".join(parts) + "\n"


def diff_markdown(rev: str) -> str:
    """Metrics and params that differ between `rev` and the workspace (the review without plots)."""
    return review_markdown(rev)
