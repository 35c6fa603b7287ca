"""The shipped model: a checkpoint as an MLflow pyfunc, registered, and the `champion` alias.

The pyfunc carries everything a client would otherwise have to know: the weights and architecture,
the class names, the input size and resampling of `prepare` (the network normalises with its own
mean and std) and the test-time augmentation of `evaluate`. It answers a DataFrame with an `image`
column of encoded image files (JPEG, PNG, WebP, ... bytes; base64 strings in MLflow's JSON, as its
scoring server expects for binary columns) with one row per image: the class, its probability and
the probability of every class. `sstl serve` serves it with MLflow's own server; `sstl predict
--model models:/<name>@champion` loads the same object.

The `champion` alias moves to a new version only when it beats the current champion on test
without losing on test-add; the comparison is recorded on the run and on the version (tags).
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, DataType, Map, Schema
from PIL import Image

import sstl
from sstl.config.runtime import Tta
from sstl.core.environment import package_version
from sstl.core.errors import SstlError
from sstl.core.files import file_digest
from sstl.data.images import UnreadableImage, decode
from sstl.models.checkpoint import load_checkpoint
from sstl.models.inference import infer
from sstl.runtime.device import CPU
from sstl.track.tracking import model_store, store_lock, tracking_uri

CHAMPION = "champion"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema(
        [ColSpec("string", "class"), ColSpec("double", "probability"), ColSpec(Map(DataType.double), "probabilities")]
    ),
)


# what the served code imports (its pip requirements); `sstl` itself travels with the model (code_paths)
REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "tqdm", "mlflow")


class ImageClassifier(PythonModel):
    """The checkpoint behind MLflow's pyfunc interface: encoded images in, classes out."""

    tta: Tta = "none"

    def load_context(self, context: Any) -> None:
        self.load(Path(context.artifacts["checkpoint"]))
        self.tta = (context.model_config or {}).get("tta", "none")

    def load(self, checkpoint: Path) -> None:
        self.model, meta = load_checkpoint(checkpoint)
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.interpolation: str = meta.get("interpolation") or self.model.data.interpolation

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """DataFrame with `image` (bytes or base64 str) -> class, probability, probabilities ({class:
        probability}, 4 decimals) per row; an unreadable image fails the request with its row
        number (MLflow answers 400)."""
        if "image" not in model_input.columns:
            raise MlflowException("expected a column `image` of encoded image bytes", INVALID_PARAMETER_VALUE)
        images = [self._decode(i, v) for i, v in enumerate(model_input["image"])]
        probs = infer(self.model, torch.from_numpy(np.stack(images)), tta=self.tta, desc="serve", runtime=CPU).softmax(
            1
        )
        return probability_table(probs, self.classes)

    def _decode(self, row: int, value: Any) -> np.ndarray:
        data = base64.b64decode(value) if isinstance(value, str) else bytes(value)
        try:
            return decode(data, self.image_size, self.interpolation)
        except UnreadableImage as err:
            raise MlflowException(f"image {row}: {err}", INVALID_PARAMETER_VALUE) from None


def probability_table(probs: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """(N, C) probabilities -> DataFrame: class, probability, probabilities ({class: p})."""
    best, index = probs.max(1)
    rows = probs.tolist()
    return pd.DataFrame(
        {
            "class": [classes[i] for i in index.tolist()],
            "probability": [round(p, 4) for p in best.tolist()],
            "probabilities": [{c: round(p, 4) for c, p in zip(classes, r, strict=True)} for r in rows],
        }
    )


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes: a request body for the served model."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def load(uri: str) -> ImageClassifier:
    """`models:/<name>@<alias>`, `models:/<name>/<version>` or `runs:/...` -> the loaded classifier."""
    try:
        with model_store():
            model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except MlflowException as err:
        raise SstlError(f"model {uri}: {err.message.splitlines()[0]} (list them in `sstl ui`, Models)") from None
    if not isinstance(model, ImageClassifier):
        raise SstlError(f"model {uri} is not an sstl image classifier: pass one logged by `evaluate`")
    return model


@dataclass(frozen=True)
class Scores:
    """What decides the champion: test and test-add accuracy (test-add None where the data has none),
    and a digest of the images and labels they were measured on (None: unknown)."""

    test: float
    test_add: float | None
    data: str | None = None

    @classmethod
    def of(cls, metrics: Mapping[str, Mapping[str, float]], data: str | None = None) -> Scores:
        add = metrics.get("test-add", {}).get("accuracy")
        return cls(test=float(metrics["test"]["accuracy"]), test_add=None if add is None else float(add), data=data)

    def tags(self) -> dict[str, str]:
        tags = {"test_accuracy": f"{self.test:.4f}", "test_add_accuracy": _fmt(self.test_add)}
        return tags | ({"test_data_sha256": self.data} if self.data else {})

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Scores | None:
        if "test_accuracy" not in tags:
            return None
        add = tags.get("test_add_accuracy", "none")
        return cls(
            test=float(tags["test_accuracy"]),
            test_add=None if add == "none" else float(add),
            data=tags.get("test_data_sha256"),
        )


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


def data_digest(*splits: tuple[torch.Tensor, torch.Tensor]) -> str:
    """sha256 of (images, labels) pairs: whether two versions were scored on the same test images."""
    h = hashlib.sha256()
    for images, labels in splits:
        for t in (images, labels):
            h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def beats(new: Scores, old: Scores) -> tuple[bool, str]:
    """Whether `new` should take the alias from `old`, and why, in one line: better on test and not
    worse on test-add (where both have it), measured on the same test images (where both say which)."""
    if new.data and old.data and new.data != old.data:
        return False, (
            f"test data changed ({old.data[:8]} -> {new.data[:8]}): the scores do not compare; "
            "re-evaluate the champion on this data or move the alias by hand"
        )
    test_ok = new.test > old.test
    add_ok = new.test_add is None or old.test_add is None or new.test_add >= old.test_add
    why = f"test {new.test:.4f} {'>' if test_ok else '<='} {old.test:.4f}"
    if new.test_add is not None and old.test_add is not None:
        why += f", test-add {new.test_add:.4f} {'>=' if add_ok else '<'} {old.test_add:.4f}"
    return test_ok and add_ok, why


def publish(
    checkpoint: Path,
    *,
    name: str,
    metrics: Mapping[str, Mapping[str, float]],
    tta: Tta,
    example: np.ndarray,
    data: str | None = None,
) -> dict[str, str]:
    """Log `checkpoint` as a pyfunc in the active run, register it as a new version of `name` and move
    the champion alias if it wins; returns the decision as tags (also set on the run and the version).
    `data`: digest of the test images the metrics come from (`data_digest`)."""
    checkpoint = Path(checkpoint).resolve()
    # one registration at a time (parallel experiments: versions and the alias stay consistent), written
    # from the project root: artifact locations are relative to it, not to a `--temp` experiment's copy
    with store_lock(), model_store():
        model_info = mlflow.pyfunc.log_model(
            name=checkpoint.stem,
            python_model=str(Path(__file__).with_name("served.py")),  # models from code: nothing pickled
            artifacts={"checkpoint": str(checkpoint)},
            model_config={"tta": tta},
            code_paths=[str(Path(sstl.__file__).parent)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [encode_png(example)]}),
            pip_requirements=[f"{p}=={package_version(p)}" for p in REQUIREMENTS],
            registered_model_name=name,
        )
        client = MlflowClient()
        version = str(model_info.registered_model_version)
        scores = Scores.of(metrics, data)
        for key, value in scores.tags().items():  # before the alias can point here: a champion has scores
            client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "model", checkpoint.stem)  # teacher, student, finetuned, ...
        client.set_model_version_tag(name, version, "checkpoint_sha256", file_digest(checkpoint))
        decision = crown(client, name=name, version=version, scores=scores)
        for key, value in decision.items():
            client.set_model_version_tag(name, version, key, value)
    mlflow.set_tags({f"sstl.{k}": v for k, v in decision.items()} | {"sstl.model_version": version})
    return decision


def champion_version(name: str) -> Any | None:
    """The version the champion alias points at in the project's store, or None (no such model, or no
    alias yet). A store that does not exist yet is not created for the question."""
    if not Path(tracking_uri().removeprefix("sqlite:///")).is_file() and tracking_uri().startswith("sqlite:///"):
        return None
    with store_lock(), model_store():
        try:
            return MlflowClient().get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None


def crown(client: MlflowClient, *, name: str, version: str, scores: Scores) -> dict[str, str]:
    """Point `champion` at `version` when it beats the current champion (or there is none)."""
    champion = client.get_registered_model(name).aliases.get(CHAMPION)  # {alias: version}
    current = None if champion is None else client.get_model_version(name, str(champion))
    old = None if current is None else Scores.from_tags(current.tags)
    if current is None or old is None:
        won, why = True, "no champion yet" if current is None else f"champion v{current.version} has no scores"
    else:
        won, why = beats(scores, old)
        why = f"v{version} vs champion v{current.version}: {why}"
    if won:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {
        "champion": "promoted" if won else "kept",
        "champion_reason": why,
        "champion_previous": "none" if current is None else str(current.version),
    }
