"""Model factory: a backbone (torchvision, timm, or sstl's small CNNs) plus a small MLP head.

`create_model(cfg, num_classes)` is the one way to build a network; an unknown arch fails with the
closest names. The backbone's module groups are kept in order (stem first) so that transfer learning
can freeze all of it and later unfreeze the top `n` blocks; the preprocessing the backbone expects
(mean, std, input size, interpolation: timm's data config) travels with the model and its checkpoint.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.error import URLError

import timm
import torch
import torch.nn.functional as F
import torchvision
from pydantic import BaseModel, ConfigDict, Field
from timm.models import group_modules
from torch import nn

from sstl.errors import SstlError
from sstl.files import atomic_path
from sstl.provenance import code_digest
from sstl.weights import imagenet_state_dict

# ImageNet statistics: the input scale of torchvision's backbones and sstl's small CNNs; timm backbones bring theirs.
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


class Whiten(nn.Module):
    """airbench's first layer: a 2x2 conv whose 2 * 12 filters are the +/- eigenvectors of the training
    images' 2x2-patch covariance, scaled by 1 / sqrt(eigenvalue): decorrelated inputs from the first step.

    The filters are a buffer, set once from data (`fit`, called by the training loop before the first
    step of a network whose `ready` is false) and never trained; the bias trains.
    """

    def __init__(self, kernel: int = 2) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.ready: torch.Tensor
        self.register_buffer("weight", torch.zeros(2 * 3 * kernel**2, 3, kernel, kernel))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # saved: a checkpoint is never refitted
        self.bias = nn.Parameter(torch.zeros(2 * 3 * kernel**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """x: normalised images (N, 3, H, W), fp32; a few thousand are plenty (airbench uses 5,000)."""
        k = self.weight.shape[-1]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        cov = patches.T @ patches / len(patches)  # (12, 12)
        values, vectors = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
        filters = (vectors.T / torch.sqrt(values.clamp(min=0) + eps)[:, None]).flip(0).reshape(-1, 3, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).float())  # +/-: GELU keeps both signs' information
        self.ready.fill_(True)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _airbench_bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a fixed unit scale and a trained shift; momentum 0.4 (airbench's 0.6 in its convention)."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4, affine=False)
    bn.bias = nn.Parameter(torch.zeros(channels))
    return bn


def _dirac_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 conv whose first `cin` filters start as identities: a deep net that starts near a shallow one."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[: min(cin, cout)])
    return conv


def airbench(widths: tuple[int, int, int]) -> tuple[list[nn.Module], int]:
    """KellerJordan/cifar10-airbench's network (airbench94 at widths 64, 256, 256): the whitening layer,
    then three groups of conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU. A 32 px input ends
    at 3x3, max-pooled to one vector; the 1/9 scale keeps the logits' scale that its schedule assumes."""
    blocks: list[nn.Module] = [nn.Sequential(Whiten(), nn.GELU())]
    cin = 24
    for w in widths:
        blocks.append(
            nn.Sequential(
                _dirac_conv(cin, w), nn.MaxPool2d(2), _airbench_bn(w), nn.GELU(),
                _dirac_conv(w, w), _airbench_bn(w), nn.GELU(),
            )
        )  # fmt: skip
        cin = w
    return blocks, widths[-1]


def fit_whitening(model: nn.Module, images: torch.Tensor) -> bool:
    """Set every not yet fitted `Whiten` layer of `model` from uint8 images (N, H, W, 3) (at most 5,000 are
    used); whether there was one. Weights loaded from a checkpoint or a pretext stage are kept."""
    layers = [m for m in model.modules() if isinstance(m, Whiten) and not bool(m.ready)]
    if not layers:
        return False
    x = images[:5000].permute(0, 3, 1, 2).float().div(255.0)
    if isinstance(model, Classifier):
        x = (x - model.mean.cpu()) / model.std.cpu()
    for layer in layers:
        device = layer.weight.device
        layer.cpu().fit(x)
        layer.to(device)
    return True


# arch name -> (family, channel widths of the three groups); no pretrained weights exist for these
CONVNETS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "convnet_s": ("convnet", (32, 64, 128)),
    "convnet_m": ("convnet", (48, 96, 192)),
    "convnet_l": ("convnet", (64, 128, 256)),
    "airbench_s": ("airbench", (32, 128, 128)),  # a quarter of airbench94's compute
    "airbench_m": ("airbench", (48, 192, 192)),
    "airbench_l": ("airbench", (64, 256, 256)),  # airbench94
}

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ModelConfig(BaseModel):
    """What a network is: backbone, where its weights come from, and the head on top."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    weights: str = Field(
        "none", description="none | imagenet | pretrain | path to a state-dict file or sstl checkpoint"
    )
    head_layers: int = Field(1, ge=0, le=4, description="hidden layers in the MLP head (0: linear)")
    hidden_size: int = Field(128, ge=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    widths: tuple[int, int, int] | None = Field(
        None, description="channels of the three groups of sstl's small CNNs (convnet_*, airbench_*); null: the arch's"
    )
    resize: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="side (px) the model resizes its images to, bilinear, before the backbone; null: as packed "
        "(a 32-px set reaches an ImageNet backbone at 128 px without packing 16x the bytes)",
    )


class DataConfig(BaseModel):
    """How pixels must reach a backbone (timm's data config): it travels with the model and its checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    input_size: int = Field(224, ge=8, description="side the backbone was trained at, pixels")
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic"
    fixed_input_size: bool = False
    resize: int | None = Field(None, ge=8, description="side (px) preprocess resizes to (ModelConfig.resize)")


class Classifier(nn.Module):
    """backbone (N, 3, H, W) -> (N, D) pooled features -> head -> (N, C) logits.

    `blocks` are the backbone's module groups, stem first, top last: what transfer learning freezes
    and unfreezes (not registered twice: they are views into `backbone`). `data` says how to turn
    uint8 pixels into the backbone's input (`preprocess`), so training, inference and `predict`
    cannot normalise differently.
    """

    def __init__(self, backbone: nn.Module, blocks: list[nn.Module], head: nn.Module, data: DataConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.data = data
        self.blocks: tuple[nn.Module, ...] = tuple(blocks)  # a plain attribute: state_dict holds them once
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(data.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3), on any device -> float32 (N, 3, H, W) normalised on the model's device;
        (N, 3, S, S) when `data.resize` is S."""
        x = images.to(self.mean.device, non_blocking=self.mean.is_cuda).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        side = self.data.resize
        if side is None or x.shape[-2:] == (side, side):
            return x
        # after augmentation and normalisation: the batched uint8 augmentation runs at the packed size
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=x.shape[-1] > side)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) pooled features."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _sequential(blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _max_pooled(blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(1), nn.Flatten(1), _Scale(1 / 9))


def _timm_name(arch: str) -> str | None:
    """The timm model name `arch` stands for: `timm/<name>` always, a bare name unless torchvision or sstl owns it."""
    if arch.startswith("timm/"):
        return arch.removeprefix("timm/")
    if arch in ARCHS or arch in CONVNETS:
        return None
    return arch


def check_arch(arch: str) -> str:
    """`arch` if some factory builds it; else one line naming the closest known names."""
    name = _timm_name(arch)
    if name is None or name in _timm_models():
        return arch
    known = [*ARCHS, *CONVNETS, *_timm_models()]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for timm's names"
    raise SstlError(
        f"unknown arch {arch!r}: {hint} (torchvision: {', '.join(ARCHS)}; small CNNs: {', '.join(CONVNETS)}; "
        "or any timm model name)"
    )


@functools.cache
def _timm_models() -> frozenset[str]:
    return frozenset(timm.list_models())


def data_config(arch: str) -> DataConfig:
    """The preprocessing `arch` expects: timm's pretrained data config; ImageNet statistics otherwise."""
    name = _timm_name(arch)
    if name is None:
        return DataConfig(input_size=224 if arch in ARCHS else 32)
    cfg = timm.get_pretrained_cfg(name)
    d = cfg.to_dict() if cfg is not None else {}
    interpolation = d.get("interpolation") or "bicubic"
    return DataConfig(
        mean=tuple(d.get("mean") or MEAN),
        std=tuple(d.get("std") or STD),
        input_size=int((d.get("input_size") or (3, 224, 224))[-1]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest", "lanczos") else "bicubic",
        fixed_input_size=bool(d.get("fixed_input_size", False)),
    )


def make_head(in_dim: int, num_classes: int, cfg: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(cfg.head_layers):
        layers += [nn.Dropout(cfg.dropout), nn.Linear(width, cfg.hidden_size), ACTIVATIONS[cfg.activation]()]
        width = cfg.hidden_size
    layers += [nn.Dropout(cfg.dropout), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def create_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build `cfg.arch`, then load its backbone weights.

    arch: a torchvision name (ARCHS), an sstl small CNN (CONVNETS), or any timm name (`timm/<name>`
    when torchvision has the same name). weights: `none`; `imagenet` (an installed weight package,
    else the torch / timm hub caches: see sstl.weights); a state-dict file; or an sstl checkpoint
    (e.g. the `pretrain` stage's), whose backbone is copied.
    """
    check_arch(cfg.arch)
    payload = _read_weights_file(Path(cfg.weights)) if cfg.weights not in ("none", "imagenet") else None
    is_sstl = isinstance(payload, dict) and {"state_dict", "model"} <= set(payload)  # written by save_checkpoint
    sstl_ckpt = payload if is_sstl else None
    timm_name = _timm_name(cfg.arch)
    if cfg.arch in CONVNETS:
        if cfg.weights != "none" and sstl_ckpt is None:
            raise SstlError(
                f"{cfg.arch} has no {cfg.weights} weights: use weights none, pretrain, or an sstl checkpoint"
            )
        family, widths = CONVNETS[cfg.arch]
        blocks, width = (airbench if family == "airbench" else convnet)(cfg.widths or widths)
        backbone = _sequential(blocks) if family == "convnet" else _max_pooled(blocks)
    elif timm_name is None:
        net = torchvision.models.get_model(cfg.arch, weights=None)
        if cfg.weights != "none" and sstl_ckpt is None:
            state = _imagenet_state_dict(cfg.arch) if cfg.weights == "imagenet" else _file_state(payload, cfg.weights)
            _load_backbone(net, cfg.arch, cfg.weights, state)
        blocks, width = ARCHS[cfg.arch](net)
        backbone = _sequential(blocks)
    else:
        backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
        if cfg.weights != "none" and sstl_ckpt is None:
            state = imagenet_state_dict(timm_name) if cfg.weights == "imagenet" else _file_state(payload, cfg.weights)
            _load_backbone(backbone, cfg.arch, cfg.weights, state)
        blocks, width = _timm_blocks(backbone), int(getattr(backbone, "num_features"))  # noqa: B009
    data = data_config(cfg.arch).model_copy(update={"resize": cfg.resize})
    model = Classifier(backbone, blocks, make_head(width, num_classes, cfg), data)
    if sstl_ckpt is not None:
        _load_sstl_backbone(model, sstl_ckpt, cfg)
    return model


def _timm_blocks(net: nn.Module) -> list[nn.Module]:
    """timm's own coarse grouping (stem, stages, head convs), each group as one ModuleList."""
    groups = group_modules(net, net.group_matcher(coarse=True))  # type: ignore[operator]  # {group: [module names]}, in depth order
    named = dict(net.named_modules())
    return [nn.ModuleList([named[name] for name in names]) for _, names in sorted(groups.items())]


def _read_weights_file(path: Path) -> Any:
    if not path.is_file():
        raise SstlError(
            f"weights file {path} not found: set weights to none, imagenet, pretrain, or a state-dict file path"
        )
    return _torch_load(path)


def _file_state(payload: Any, path: str) -> dict[str, torch.Tensor]:
    state = payload
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training-script dump
    if not isinstance(state, dict):
        raise SstlError(f"weights file {path} holds no state dict: save one with torch.save(model.state_dict(), path)")
    return state


def _load_sstl_backbone(model: Classifier, payload: dict[str, Any], cfg: ModelConfig) -> None:
    """Copy the backbone of an sstl checkpoint of the same arch (its head is ignored)."""
    if payload["model"]["arch"] != cfg.arch:
        raise SstlError(
            f"weights {cfg.weights} hold a {payload['model']['arch']} backbone, not {cfg.arch}: "
            "use the same arch or other weights"
        )
    prefix = "backbone."
    state = {k.removeprefix(prefix): v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError:
        raise SstlError(
            f"weights {cfg.weights} do not fit {cfg.arch} (a checkpoint from an older sstl?): re-run the stage "
            "that wrote it"
        ) from None


def _load_backbone(net: nn.Module, arch: str, weights: str, state: dict[str, torch.Tensor]) -> None:
    """Load a full-network state dict (torchvision's or timm's keys) into the backbone `net`."""
    # Keep only tensors that fit: a file trained for another number of classes still gives its backbone.
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not _is_head_key(k)]
    extra = [k for k in state if k not in own and not _is_head_key(k)]
    if extra:  # e.g. resnet34 weights offered to resnet18: every resnet18 key fits, the rest would be lost
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(extra)} tensors the model lacks "
            f"(first: {extra[0]}); use weights saved from {arch}"
        )
    if missing:
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(missing)} backbone tensors missing "
            f"(first: {missing[0]}); use weights saved from {arch}"
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
    return key.startswith(("fc.", "classifier.", "head.", "head_"))


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache (or downloaded where a network is)."""
    entry = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return entry.get_state_dict(progress=False)
    except (URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        raise SstlError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(err).__name__}): "
            f"copy {Path(entry.url).name} to {cache}, or set weights to a local file path"
        ) from None


def set_trainable(model: Classifier, unfreeze_blocks: int) -> None:
    """Freeze the backbone but its top `unfreeze_blocks` blocks; the head always trains."""
    n = len(model.blocks)
    model.backbone.requires_grad_(unfreeze_blocks >= n)  # all blocks: loose parameters (ViT's tokens) too
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i >= n - unfreeze_blocks)
    model.head.requires_grad_(True)


def train_mode(model: Classifier, unfreeze_blocks: int, *, freeze_bn: bool = False) -> None:
    """model.train(), but frozen blocks stay in eval mode so their BatchNorm statistics hold still;
    with `freeze_bn` every BatchNorm does (a small batch of augmented photos estimates them badly)."""
    model.train()
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        if i < n - unfreeze_blocks:
            block.eval()
    if freeze_bn:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


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
    if not Path(path).is_file():
        raise SstlError(f"model {path} not found: run the pipeline first (`sstl run`) or pass --model")
    payload = _torch_load(Path(path))
    if not isinstance(payload, dict) or not {"model", "classes", "state_dict"} <= payload.keys():
        raise SstlError(
            f"{path} is not an sstl checkpoint (no model config, classes and weights): pass a model a stage "
            "wrote, e.g. models/finetuned.pt (a plain state_dict goes to teacher.weights instead)"
        )
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
    model.to(device).eval()
    return model, payload


def model_digest(model: nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes): which network scored or featured a set."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
