"""What the review tables share: the evaluation splits, the model order, and how a cell prints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

SPLITS = ("test", "test-add")
METRICS_FILE = "reports/metrics.json"  # the one DVC metrics file: evaluation results only
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "ece": "ECE"}
WORKSPACE = "workspace"
MISSING = "—"


def order_key(name: str, known: Sequence[str]) -> tuple[int, str]:
    """Known names in their fixed order, the others after them alphabetically: rows never move."""
    return (known.index(name), "") if name in known else (len(known), name)


def model_order(name: str) -> tuple[int, str]:
    """The pipeline's order: the baseline first (probe, probe_student), the teacher, each round's student
    (params `rounds`: student, student2, ... by name), the fine-tuned student last."""
    if name == "probe" or name.startswith("probe_"):
        return (-1, name)
    return {"teacher": (0, ""), "finetuned": (2, "")}.get(name, (1, name))


def cell(v: Any) -> str:
    """A param value for a table cell: YAML-like scalars, JSON for lists and dicts, pipes escaped."""
    if v is None:
        return MISSING
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)
    return text.replace("|", "\\|")
