"""`sstl exp show`: DVC experiments as a narrow table of changed params and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sstl.review.layout import METRICS_FILE, MISSING, SPLITS, WORKSPACE, cell, model_order


@dataclass
class Experiment:
    """One row of `dvc exp show`: its name, short rev, flat params and accuracies per (model, split)."""

    name: str
    rev: str
    params: dict[str, Any]
    accuracy: dict[tuple[str, str], float]


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """{a: {b: 1}} -> ("a.b", 1): the dotted names `-S` takes."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _experiment(node: dict[str, Any], fallback: str) -> Experiment | None:
    data = node.get("data")
    if not isinstance(data, dict):
        return None
    params = {}
    for path, per_file in (data.get("params") or {}).items():
        for k, v in _flat((per_file or {}).get("data") or {}):
            params[k if path == "params.yaml" else f"{path}:{k}"] = v
    metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}
    accuracy = {
        (m, s): float(v["accuracy"])
        for m, per_split in metrics.items()
        if isinstance(per_split, dict)
        for s, v in per_split.items()
        if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float))
    }
    rev = str(data.get("rev") or node.get("rev") or "")
    name = str(data.get("name") or node.get("name") or fallback or rev)
    if rev == WORKSPACE:
        return Experiment(name=WORKSPACE, rev="", params=params, accuracy=accuracy)
    return Experiment(name=rev[:7] if name == rev else name, rev=rev[:7], params=params, accuracy=accuracy)


def experiments(table: Any) -> list[Experiment]:
    """`dvc exp show --json` -> rows in DVC's order: workspace, each commit, then its experiments."""
    rows: list[Experiment] = []
    for commit in table if isinstance(table, list) else []:
        row = _experiment(commit, commit.get("rev", ""))
        if row is not None:
            rows.append(row)
        for exp in commit.get("experiments") or []:
            for node in exp.get("revs") or []:
                child = _experiment(node, exp.get("name") or "")
                if child is not None:
                    rows.append(child)
    return rows


def changed_params(rows: Sequence[Experiment]) -> list[str]:
    """Params whose value is not the same in every row shown (missing counts as a value)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row.params))
    return [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rows}) > 1]


SHORT_SPLIT = {"test": "test", "test-add": "t-add"}


@dataclass
class Column:
    """A text column: two header lines (`top` may span the next columns), its width and alignment."""

    top: str
    bottom: str
    width: int
    right: bool = False
    span: int = 1


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _header(columns: Sequence[Column]) -> list[str]:
    """The two header lines; a spanning `top` is centred over its columns."""
    top, i = [], 0
    while i < len(columns):
        group = columns[i : i + columns[i].span]
        width = sum(c.width for c in group) + 2 * (len(group) - 1)
        top.append(_fit(columns[i].top, width).center(width) if columns[i].span > 1 else columns[i].top.ljust(width))
        i += len(group)
    bottom = [c.bottom.rjust(c.width) if c.right else c.bottom.ljust(c.width) for c in columns]
    return ["  ".join(top).rstrip(), "  ".join(bottom).rstrip()]


def _param_column(key: str, rows: Sequence[Experiment]) -> Column:
    """A param's column: its section on the first header line, its leaf on the second, 5-14 wide."""
    *parents, leaf = key.split(".")
    section = ".".join(parents)
    width = min(max([len(leaf), len(section), 5, *(len(cell(r.params.get(key))) for r in rows)]), 14)
    return Column(top=_fit(section, width), bottom=_fit(leaf, width), width=width)


def exp_table(rows: Sequence[Experiment], *, width: int = 120, decimals: int = 4) -> str:
    """Experiments as a plain text table that fits `width` columns: experiment (name and short rev), the
    params that differ between them, test / test-add accuracy of each model; params that do not fit are
    named below the table (all of them in --md)."""
    accs = [(m, s) for m in model_names(rows) for s in SPLITS if any((m, s) in r.accuracy for r in rows)]
    names = [f"{r.name} {r.rev}" if r.rev and r.name != r.rev else r.name for r in rows]
    first = Column(top="", bottom="experiment", width=min(max([10, *map(len, names)]), 24))
    metrics = []
    for k, (m, s) in enumerate(accs):
        starts = k == 0 or accs[k - 1][0] != m
        span = sum(1 for model, _ in accs if model == m) if starts else 1
        top = m if starts else ""
        metrics.append(Column(top=top, bottom=SHORT_SPLIT.get(s, s), width=decimals + 2, right=True, span=span))
    used = first.width + sum(c.width + 2 for c in metrics)
    params, left_out = [], []
    for key in changed_params(rows):
        column = _param_column(key, rows)
        if used + column.width + 2 <= width:
            params.append((key, column))
            used += column.width + 2
        else:
            left_out.append(key)
    lines = _header([first, *(c for _, c in params), *metrics])
    for row, name in zip(rows, names, strict=True):
        cells = [_fit(name, first.width).ljust(first.width)]
        cells += [_fit(cell(row.params.get(k)).replace("\\|", "|"), c.width).ljust(c.width) for k, c in params]
        for (m, s), c in zip(accs, metrics, strict=True):
            v = row.accuracy.get((m, s))
            cells.append((MISSING if v is None else f"{v:.{decimals}f}").rjust(c.width))
        lines.append("  ".join(cells).rstrip())
    if left_out:
        note = f"+{len(left_out)} changed params not shown (sstl exp show --md): {', '.join(left_out)}"
        lines.append(_fit(note, width))
    return "\n".join(lines) + "\n"


def exp_markdown(rows: Sequence[Experiment], *, decimals: int = 4) -> str:
    """The same rows as a markdown table, every changed param with its full name."""
    accs = [(m, s) for m in model_names(rows) for s in SPLITS if any((m, s) in r.accuracy for r in rows)]
    keys = changed_params(rows)
    head = ["experiment", "rev", *keys, *(f"{m} {s}" for m, s in accs)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---|" * len(keys) + "---:|" * len(accs)]
    for r in rows:
        cells = [r.name, r.rev or MISSING, *(cell(r.params.get(k)) for k in keys)]
        cells += [MISSING if (v := r.accuracy.get(a)) is None else f"{v:.{decimals}f}" for a in accs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_names(rows: Sequence[Experiment]) -> list[str]:
    return sorted({m for r in rows for m, _ in r.accuracy}, key=model_order)
