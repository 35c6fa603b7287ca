"""Model factory: a torchvision backbone cut into blocks, plus a small MLP head.

`create_model(cfg, num_classes)` is the one way to build a network; it raises on an unknown arch and
lists the valid ones. The backbone is kept as an ordered list of blocks (stem first) so that
transfer learning can freeze all of it and later unfreeze the top `n` blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.error import URLError

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sstl.errors import SstlError
from sstl.files import atomic_path
from sstl.provenance import git_commit

# ImageNet statistics; used for every backbone so pretrained and scratch models share one input scale.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _resnet_blocks(m: Any) -> tuple[list[nn.Module], int]:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return [stem, m.layer1, m.layer2, m.layer3, m.layer4], m.fc.in_features


def _features_blocks(m: Any) -> tuple[list[nn.Module], int]:
    # mobilenet / efficientnet: `features` is a Sequential of stages; its last conv sets the width.
    blocks = list(m.features)
    last_conv = [c for c in blocks[-1].modules() if isinstance(c, nn.Conv2d)][-1]
    return blocks, last_conv.out_channels


# arch name -> how to cut the torchvision model into (blocks, feature width)
ARCHS: dict[str, Callable[[Any], tuple[list[nn.Module], int]]] = {
    "resnet18": _resnet_blocks,
    "resnet34": _resnet_blocks,
    "resnet50": _resnet_blocks,
    "mobilenet_v3_small": _features_blocks,
    "mobilenet_v3_large": _features_blocks,
    "efficientnet_b0": _features_blocks,
    "efficientnet_b1": _features_blocks,
}


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


def convnet(widths: tuple[int, int, int]) -> tuple[list[nn.Module], int]:
    """A small CNN for low-resolution photos (CIFAR-sized), in the spirit of airbench:
    stem conv, then three groups of conv -> 2x2 max-pool -> conv; a 32 px input ends at 4x4."""
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(3, widths[0]))]
    cin = widths[0]
    for w in widths:
        blocks.append(nn.Sequential(*_conv_bn(cin, w), nn.MaxPool2d(2), *_conv_bn(w, w)))
        cin = w
    return blocks, widths[-1]


# arch name -> channel widths of the three groups; no pretrained weights exist for these
CONVNETS: dict[str, tuple[int, int, int]] = {
    "convnet_s": (32, 64, 128),
    "convnet_m": (48, 96, 192),
    "convnet_l": (64, 128, 256),
}

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ModelConfig(BaseModel):
    """What a network is: backbone, where its weights come from, and the head on top."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    weights: str = Field("none", description="none | imagenet | path to a state-dict file")
    head_layers: int = Field(1, ge=0, le=4, description="hidden layers in the MLP head (0: linear)")
    hidden_size: int = Field(128, ge=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class Classifier(nn.Module):
    """blocks -> global average pool -> head. `blocks[0]` is the stem, `blocks[-1]` the top."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) pooled features."""
        return self.pool(self.blocks(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_arch(arch: str) -> str:
    if arch not in ARCHS and arch not in CONVNETS:
        raise SstlError(f"unknown arch {arch!r}: choose one of {', '.join(sorted([*ARCHS, *CONVNETS]))}")
    return arch


def make_head(in_dim: int, num_classes: int, cfg: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(cfg.head_layers):
        layers += [nn.Dropout(cfg.dropout), nn.Linear(width, cfg.hidden_size), ACTIVATIONS[cfg.activation]()]
        width = cfg.hidden_size
    layers += [nn.Dropout(cfg.dropout), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def create_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build `cfg.arch` with its backbone weights loaded.

    weights: `none`; `imagenet` (torchvision's weights API, torchvision archs only); a torchvision
    state-dict file; or an sstl checkpoint (e.g. the `pretrain` stage's), whose blocks are copied.
    """
    check_arch(cfg.arch)
    payload = _read_weights_file(Path(cfg.weights)) if cfg.weights not in ("none", "imagenet") else None
    is_sstl = isinstance(payload, dict) and {"state_dict", "model"} <= set(payload)  # written by save_checkpoint
    sstl_ckpt = payload if is_sstl else None
    if cfg.arch in CONVNETS:
        if cfg.weights != "none" and sstl_ckpt is None:
            raise SstlError(
                f"{cfg.arch} has no {cfg.weights} weights: use weights none, pretrain, or an sstl checkpoint"
            )
        blocks, width = convnet(CONVNETS[cfg.arch])
    else:
        net = torchvision.models.get_model(cfg.arch, weights=None)
        if cfg.weights != "none" and sstl_ckpt is None:
            _load_backbone(net, cfg.arch, cfg.weights, payload)
        blocks, width = ARCHS[cfg.arch](net)
    model = Classifier(blocks, make_head(width, num_classes, cfg))
    if sstl_ckpt is not None:
        _load_blocks(model, sstl_ckpt, cfg)
    return model


def _read_weights_file(path: Path) -> Any:
    if not path.is_file():
        raise SstlError(
            f"weights file {path} not found: set weights to none, imagenet, pretrain, or a state-dict file path"
        )
    return _torch_load(path)


def _load_blocks(model: Classifier, payload: dict[str, Any], cfg: ModelConfig) -> None:
    """Copy the backbone blocks of an sstl checkpoint of the same arch (its head is ignored)."""
    if payload["model"]["arch"] != cfg.arch:
        raise SstlError(
            f"weights {cfg.weights} hold a {payload['model']['arch']} backbone, not {cfg.arch}: "
            "use the same arch or other weights"
        )
    blocks = {k.removeprefix("blocks."): v for k, v in payload["state_dict"].items() if k.startswith("blocks.")}
    model.blocks.load_state_dict(blocks)


def _load_backbone(net: nn.Module, arch: str, weights: str, file_payload: Any = None) -> None:
    """Load torchvision-format weights: ImageNet's, or `file_payload` read from the file `weights`."""
    state: Any
    if weights == "imagenet":
        state = _imagenet_state_dict(arch)
    else:
        state, path = file_payload, weights
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # an sstl checkpoint or a training-script dump
        if not isinstance(state, dict):
            raise SstlError(
                f"weights file {path} holds no state dict: save one with torch.save(model.state_dict(), path)"
            )
    # Keep only tensors that fit: a file trained for another number of classes still gives its backbone.
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not _is_head_key(k)]
    extra = [k for k in state if k not in own and not _is_head_key(k)]
    if extra:  # e.g. resnet34 weights offered to resnet18: every resnet18 key fits, the rest would be lost
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(extra)} tensors the model lacks "
            f"(first: {extra[0]}); use weights saved from torchvision's {arch}"
        )
    if missing:
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(missing)} backbone tensors missing "
            f"(first: {missing[0]}); use weights saved from torchvision's {arch}"
        )
    net.load_state_dict(fitting, strict=False)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file (pickle, zip, index errors)
        raise SstlError(
            f"{path} is not a readable PyTorch file ({type(err).__name__}): re-save or re-download it"
        ) from None


def _is_head_key(key: str) -> bool:
    return key.startswith(("fc.", "classifier."))


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    entry = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return entry.get_state_dict(progress=False)
    except (URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        raise SstlError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({err}): "
            f"copy {Path(entry.url).name} to {cache}, or set weights to a local file path"
        ) from None


def set_trainable(model: Classifier, unfreeze_blocks: int) -> None:
    """Freeze the backbone but its top `unfreeze_blocks` blocks; the head always trains."""
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i >= n - unfreeze_blocks)
    model.head.requires_grad_(True)


def train_mode(model: Classifier, unfreeze_blocks: int) -> None:
    """model.train(), but frozen blocks stay in eval mode so their BatchNorm statistics hold still."""
    model.train()
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        if i < n - unfreeze_blocks:
            block.eval()


def save_checkpoint(
    path: Path, model: Classifier, cfg: ModelConfig, classes: list[str], image_size: int, **meta: Any
) -> None:
    """Weights plus all it takes to rebuild and use them: config, classes, input size, git commit."""
    payload = {
        "state_dict": model.state_dict(),
        "model": cfg.model_dump(),
        "classes": classes,
        "image_size": image_size,
        "mean": MEAN,
        "std": STD,
        "git_commit": git_commit(),
        **meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> tuple[Classifier, dict[str, Any]]:
    if not Path(path).is_file():
        raise SstlError(f"model {path} not found: run the pipeline first (`sstl run`) or pass --model")
    payload = _torch_load(Path(path))
    cfg = ModelConfig.model_validate({**payload["model"], "weights": "none"})
    model = create_model(cfg, len(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
