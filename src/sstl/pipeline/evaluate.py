"""The evaluate stage's per-model measurement on the evaluation splits, and the registration of its result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sstl.config.runtime import Tta
from sstl.data.dataset import ImageSet, load_split
from sstl.eval.health import model_to_use
from sstl.eval.metrics import classification_report
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.params import Params
from sstl.runtime.device import Runtime
from sstl.track import registry, tracking


def evaluate_model(
    model: Classifier, data: ImageSet, *, num_classes: int, bins: int, runtime: Runtime, tta: Tta = "none"
) -> dict[str, Any]:
    logits = infer(model, data.images, runtime=runtime, desc="evaluate", tta=tta)
    return classification_report(logits, data.labels, num_classes, bins)


def register_committed(p: Params, *, prepared: Path, health: Path, metrics: Path) -> str | None:
    """Publish the committed model to use when this store has no champion yet; the line to print, or None.

    On a fresh clone DVC rightly skips evaluate (its inputs come back byte for byte and its results are
    committed), and with it the registration that lives inside it: `sstl run` calls this after the
    pipeline, so a fresh clone ends with a servable champion whatever the cache held."""
    name = p.mlflow.model_name
    if not name or registry.champion_version(name) is not None or not (health.is_file() and metrics.is_file()):
        return None
    checkpoint = model_to_use(health)
    scores = json.loads(metrics.read_text(encoding="utf-8")).get(checkpoint.stem, {})
    if not checkpoint.is_file() or "test" not in scores:
        return None
    data = [load_split(prepared, split) for split in ("test", "test-add")]  # as evaluate digests them
    with tracking.stage_run("register", p.mlflow.experiment, {"checkpoint": str(checkpoint)}):
        decision = registry.publish(
            checkpoint,
            name=name,
            metrics=scores,
            tta=p.evaluate.tta,
            example=data[0].images[0].numpy(),
            data=registry.data_digest(*[(d.images, d.labels) for d in data]),
        )
    return f"registered {name} ({checkpoint.stem}, from the committed results): {decision['champion']} champion"
