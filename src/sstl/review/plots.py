"""DVC's plot data drawn with matplotlib (no CDN, no network), old revision beside new."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sstl.review.layout import SPLITS, WORKSPACE, model_order, order_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass
class Plot:
    """One DVC plot: its records (every rev), the x / y fields and their vega types."""

    title: str
    records: list[dict[str, Any]]
    x: str
    y: str
    x_type: str
    y_type: str
    revs: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """line (numbers vs numbers), bars (numbers per category) or confusion (category vs category)."""
        if self.x_type == "quantitative" and self.y_type == "quantitative":
            return "line"
        return "bars" if "quantitative" in (self.x_type, self.y_type) else "confusion"


def _first(node: Any, key: str) -> dict[str, Any] | None:
    """The first `key: {field: ...}` encoding in a vega-lite spec (depth first, in document order)."""
    if isinstance(node, dict):
        enc = node.get(key)
        if isinstance(enc, dict) and isinstance(enc.get("field"), str) and "aggregate" not in enc:
            return enc
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _first(child, key)
        if found is not None:
            return found
    return None


def parse_plots(data: dict[str, Any]) -> list[Plot]:
    """`dvc plots diff --json`'s `data` -> Plots; entries that are not vega (images) are skipped."""
    plots = []
    for plot_id, entries in data.items():
        for entry in entries:
            content = entry.get("content")
            if entry.get("type") != "vega" or not isinstance(content, dict):
                continue
            x, y = _first(content, "x"), _first(content, "y")
            if x is None or y is None:
                continue
            title = content.get("title", {})
            plots.append(
                Plot(
                    title=title.get("text", plot_id) if isinstance(title, dict) else str(title or plot_id),
                    records=content.get("data", {}).get("values", []),
                    x=x["field"],
                    y=y["field"],
                    x_type=x.get("type", "quantitative"),
                    y_type=y.get("type", "quantitative"),
                    revs=list(entry.get("revisions", [])),
                )
            )
    return plots


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "plot"


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _rev_order(revs: Sequence[str], old: str) -> list[str]:
    """Old first, then the workspace, then anything else: the same colours in every image."""
    return sorted(set(revs), key=lambda r: (r != old, r != WORKSPACE, r))


COLORS = {0: "#8c8c8c", 1: "#1f77b4"}  # old: grey, new: blue
DASHES = ["-", "--", ":", "-."]


def _series_key(plot: Plot) -> str | None:
    """What tells the lines of one rev apart: the file (one curve per model) or the y field."""
    for key in ("filename", "field"):
        if len({r.get(key) for r in plot.records}) > 1:
            return key
    return None


def _draw_line(ax: Axes, plot: Plot, revs: list[str]) -> None:
    key = _series_key(plot)
    names = {str(r.get(key)) for r in plot.records} if key else {""}
    series = sorted(names, key=lambda n: model_order(Path(n).stem))
    for i, rev in enumerate(revs):
        for j, name in enumerate(series):
            pts = [r for r in plot.records if r.get("rev") == rev and (not key or str(r.get(key)) == name)]
            if not pts:
                continue
            xs, ys = [_float(r[plot.x]) for r in pts], [_float(r[plot.y]) for r in pts]
            label = f"{rev} {Path(name).stem}".strip()
            ax.plot(xs, ys, DASHES[j % len(DASHES)], color=COLORS.get(i, f"C{i + 2}"), label=label, lw=1.5)
    ax.set_xlabel(plot.x)
    ax.set_ylabel(plot.y if plot.y != "dvc_inferred_y_value" else "value")
    ax.legend(fontsize=7)


def _draw_bars(ax: Axes, plot: Plot, revs: list[str]) -> None:
    value, category = (plot.x, plot.y) if plot.x_type == "quantitative" else (plot.y, plot.x)
    cats = sorted({str(r.get(category)) for r in plot.records})
    height = 0.8 / max(len(revs), 1)
    for i, rev in enumerate(revs):
        counts = {str(r.get(category)): _float(r.get(value)) for r in plot.records if r.get("rev") == rev}
        pos = [k + i * height for k in range(len(cats))]
        ax.barh(pos, [counts.get(c, 0.0) for c in cats], height=height, color=COLORS.get(i, f"C{i + 2}"), label=rev)
    ax.set_yticks([k + height * (len(revs) - 1) / 2 for k in range(len(cats))], cats, fontsize=7)
    ax.set_xlabel(value)
    ax.legend(fontsize=7)


def _draw_confusion(ax: Axes, plot: Plot, rev: str) -> None:
    rows = [r for r in plot.records if r.get("rev") == rev]
    labels = sorted({str(r.get(plot.x)) for r in plot.records} | {str(r.get(plot.y)) for r in plot.records})
    index = {c: i for i, c in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for r in rows:
        counts[index[str(r.get(plot.y))]][index[str(r.get(plot.x))]] += 1
    ax.imshow(counts, cmap="Blues")
    top = max((n for line in counts for n in line), default=0)
    for i, line in enumerate(counts):
        for j, n in enumerate(line):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=6, color="white" if n > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel(plot.x, fontsize=7)
    ax.set_ylabel(plot.y, fontsize=7)
    ax.set_title(f"{Path(plot.title).stem} ({rev})", fontsize=8)


def _save(fig: Any, path: Path) -> None:
    """PNG written atomically, without the matplotlib version in its metadata (same data, same bytes)."""
    from sstl.core.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def _model_split(plot: Plot) -> tuple[tuple[int, str], tuple[int, str]]:
    """evaluate names confusion files <model>-<split>.csv: teacher, student, finetuned; test, test-add."""
    model, _, split = Path(plot.title).stem.partition("-")
    return model_order(model), order_key(split, SPLITS)


def render_plots(data: dict[str, Any], folder: Path, *, old: str) -> list[tuple[str, Path]]:
    """Draw `dvc plots diff --json` data into PNGs in `folder` (no browser, no CDN: matplotlib's Agg):
    one image per curve plot with old and new overlaid, one for all confusion matrices (a row each, old
    left, new right). Returns (title, path) in dvc.yaml's order, confusion last."""
    from matplotlib.figure import Figure

    plots = parse_plots(data)
    out: list[tuple[str, Path]] = []
    for plot in (p for p in plots if p.kind != "confusion"):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        revs = _rev_order(plot.revs or [str(r.get("rev")) for r in plot.records], old)
        (_draw_line if plot.kind == "line" else _draw_bars)(ax, plot, revs)
        ax.set_title(plot.title, fontsize=10)
        path = folder / f"{_slug(plot.title)}.png"
        _save(fig, path)
        out.append((plot.title, path))
    confusion = sorted((p for p in plots if p.kind == "confusion"), key=_model_split)
    if confusion:
        revs = _rev_order([r for p in confusion for r in (p.revs or [str(x.get("rev")) for x in p.records])], old)
        fig = Figure(figsize=(3.2 * len(revs), 3.2 * len(confusion)), layout="constrained")
        axes = fig.subplots(len(confusion), len(revs), squeeze=False)
        for row, plot in zip(axes, confusion, strict=True):
            for ax, rev in zip(row, revs, strict=True):
                _draw_confusion(ax, plot, rev)
        path = folder / "confusion-matrices.png"
        _save(fig, path)
        out.append(("Confusion matrices", path))
    return out
