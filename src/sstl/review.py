"""A pull request's review (metrics, params and plots against a git revision, via DVC) and a narrow
experiments table that fits a terminal (`sstl report --rev`, `sstl exp show`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sstl.errors import SstlError
from sstl.report import COLUMNS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SPLITS = ("test", "test-add")
METRICS_FILE = "reports/metrics.json"  # the one DVC metrics file: evaluation results only
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "ece": "ECE"}
WORKSPACE = "workspace"
MISSING = "—"

# --- DVC ------------------------------------------------------------------------------------------------


def dvc_json(args: Sequence[str]) -> Any:
    """`python -m dvc <args> --json` with this interpreter (no `dvc` on PATH needed: works outside the
    activated venv, as in CI); a failure is one line naming the command and DVC's last message."""
    cmd = [sys.executable, "-m", "dvc", *args, "--json"]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    except subprocess.CalledProcessError as err:
        lines = [line for line in (err.stderr or err.stdout or "").strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {err.returncode}"
        raise SstlError(f"`dvc {' '.join(args)}` failed: {last}") from None
    try:
        return json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        raise SstlError(f"`dvc {' '.join(args)} --json` printed no JSON: upgrade DVC (>= 3.50)") from None


# --- the review: metrics, params, plots against a revision --------------------------------------------


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


def _order(name: str, known: Sequence[str]) -> tuple[int, str]:
    """Known names in their fixed order, the others after them alphabetically: rows never move."""
    return (known.index(name), "") if name in known else (len(known), name)


def model_order(name: str) -> tuple[int, str]:
    """The pipeline's order: the teacher, each round's student (params `rounds`: student, student2, ...
    by name), the fine-tuned student last."""
    return {"teacher": (0, ""), "finetuned": (2, "")}.get(name, (1, name))


def _models(rows: Sequence[Experiment]) -> list[str]:
    return sorted({m for r in rows for m, _ in r.accuracy}, key=model_order)


def metric_rows(diff: dict[str, Any]) -> dict[tuple[str, str], dict[str, tuple[Any, Any]]]:
    """`dvc metrics diff --all --json` -> {(model, split): {metric: (old, new)}} from the metrics
    file, in the fixed order (teacher, student, finetuned; test, test-add)."""
    rows: dict[tuple[str, str], dict[str, tuple[Any, Any]]] = {}
    for key, change in diff.get(METRICS_FILE, {}).items():
        parts = key.split(".")
        if len(parts) == 3:
            model, split, metric = parts
            rows.setdefault((model, split), {})[metric] = (change.get("old"), change.get("new"))
    return dict(sorted(rows.items(), key=lambda kv: (model_order(kv[0][0]), _order(kv[0][1], SPLITS))))


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


def _cell(v: Any) -> str:
    """A param value for a table cell: YAML-like scalars, JSON for lists and dicts, pipes escaped."""
    if v is None:
        return MISSING
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)
    return text.replace("|", "\\|")


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
    return lines + [f"| `{k}` | {_cell(d.get('old'))} | {_cell(d.get('new'))} |" for k, d in changed]


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


# --- plots: DVC's vega data drawn with matplotlib (no CDN, no network) -------------------------------


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
    from sstl.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def _model_split(plot: Plot) -> tuple[tuple[int, str], tuple[int, str]]:
    """evaluate names confusion files <model>-<split>.csv: teacher, student, finetuned; test, test-add."""
    model, _, split = Path(plot.title).stem.partition("-")
    return model_order(model), _order(split, SPLITS)


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


# --- experiments: a narrow table -----------------------------------------------------------------------


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
    width = min(max([len(leaf), len(section), 5, *(len(_cell(r.params.get(key))) for r in rows)]), 14)
    return Column(top=_fit(section, width), bottom=_fit(leaf, width), width=width)


def exp_table(rows: Sequence[Experiment], *, width: int = 120, decimals: int = 4) -> str:
    """Experiments as a plain text table that fits `width` columns: experiment (name and short rev), the
    params that differ between them, test / test-add accuracy of each model; params that do not fit are
    named below the table (all of them in --md)."""
    accs = [(m, s) for m in _models(rows) for s in SPLITS if any((m, s) in r.accuracy for r in rows)]
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
        cells += [_fit(_cell(row.params.get(k)).replace("\\|", "|"), c.width).ljust(c.width) for k, c in params]
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
    accs = [(m, s) for m in _models(rows) for s in SPLITS if any((m, s) in r.accuracy for r in rows)]
    keys = changed_params(rows)
    head = ["experiment", "rev", *keys, *(f"{m} {s}" for m, s in accs)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---|" * len(keys) + "---:|" * len(accs)]
    for r in rows:
        cells = [r.name, r.rev or MISSING, *(_cell(r.params.get(k)) for k in keys)]
        cells += [MISSING if (v := r.accuracy.get(a)) is None else f"{v:.{decimals}f}" for a in accs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
