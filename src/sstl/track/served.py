"""The file MLflow logs as the served model's code ("models from code": no pickled object). MLflow
runs it when loading the model; the checkpoint and the TTA come from the logged artifacts and
model config (sstl.track.registry.ImageClassifier.load_context)."""

from __future__ import annotations

from mlflow.models import set_model

from sstl.track.registry import ImageClassifier

set_model(ImageClassifier())
