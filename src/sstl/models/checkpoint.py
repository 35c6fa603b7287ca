"""sstl checkpoints: a model, its config, data config and classes in one file, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sstl.config.model import DataConfig, ModelConfig
from sstl.core.errors import SstlError
from sstl.core.files import atomic_path
from sstl.core.provenance import code_digest
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model
from sstl.models.weights import torch_load


def save_checkpoint(
    path: Path, model: Classifier, cfg: ModelConfig, classes: list[str], image_size: int, **meta: Any
) -> None:
    """Weights plus all it takes to rebuild and use them: config, classes, preprocessing, code digest."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": cfg.model_dump(),
        "classes": classes,
        "image_size": image_size,
        "data": model.data.model_dump(),  # mean, std, interpolation: how predict must read images
        "code_sha256": code_digest(),  # not the commit: a results-only commit must not change the bytes
        **meta,
    }
    # a file object: torch names its zip folder `archive`, not after the random temp name: equal bytes
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """(the model, the payload) of the checkpoint at `path`."""
    payload = read_checkpoint(path)
    return model_of(payload, path, device), payload


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of the checkpoint at `path`, checked, no network built: enough to read its config."""
    if not Path(path).is_file():
        raise SstlError(f"model {path} not found: run the pipeline first (`sstl run`) or pass --model")
    payload = torch_load(Path(path))
    if not isinstance(payload, dict) or not {"model", "classes", "state_dict"} <= payload.keys():
        raise SstlError(
            f"{path} is not an sstl checkpoint (no model config, classes and weights): pass a model a stage "
            "wrote, e.g. models/finetuned.pt (a plain state_dict goes to teacher.weights instead)"
        )
    return payload


def model_of(payload: dict[str, Any], path: Path, device: torch.device | str = "cpu") -> Classifier:
    """The network of a checkpoint's `payload` (read from `path`), in eval mode on `device`."""
    cfg = ModelConfig.model_validate({**payload["model"], "weights": "none"})
    model = create_model(cfg, len(payload["classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise SstlError(
            f"model {path} does not fit its own config (written by an older sstl?): re-run its stage"
        ) from None
    if "data" in payload:  # preprocessing as trained, whatever the arch's defaults are today
        model.data = DataConfig.model_validate(payload["data"])
        model.mean.copy_(torch.tensor(model.data.mean).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(model.data.std).view(1, 3, 1, 1))
    return model.to(device).eval()
