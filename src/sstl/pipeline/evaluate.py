"""The evaluate stage's per-model measurement on the evaluation splits."""

from __future__ import annotations

from typing import Any

from sstl.config.runtime import Tta
from sstl.data.dataset import ImageSet
from sstl.eval.metrics import classification_report
from sstl.models.classifier import Classifier
from sstl.models.inference import infer
from sstl.runtime.device import Runtime


def evaluate_model(
    model: Classifier, data: ImageSet, *, num_classes: int, bins: int, runtime: Runtime, tta: Tta = "none"
) -> dict[str, Any]:
    logits = infer(model, data.images, runtime=runtime, desc="evaluate", tta=tta)
    return classification_report(logits, data.labels, num_classes, bins)
