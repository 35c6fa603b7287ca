"""Model factory: a backbone (torchvision, timm, or sstl's small CNNs) plus a small MLP head.

`create_model(cfg, num_classes)` is the one way to build a network; an unknown arch fails with the
closest names. Each backbone family registers itself (`@register_family`, as timm's
`@register_model`): which arch names it owns, how it builds one and which pixels it expects; the
family of an arch is decided once, by `family_of`. The backbone's module groups are kept in order
(stem first) so that transfer learning can freeze all of it and later unfreeze the top `n` blocks;
the preprocessing the backbone expects (mean, std, input size, interpolation: timm's data config)
travels with the model and its checkpoint.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from timm.models import group_modules
from torch import nn

from sstl.config.model import MEAN, STD, DataConfig, ModelConfig
from sstl.core.errors import SstlError
from sstl.models.architectures import ARCHS, CONVNETS, airbench, convnet, max_pooled, sequential
from sstl.models.classifier import Classifier, make_head, stage_module
from sstl.models.weights import (
    file_state,
    imagenet_state_dict,
    imagenet_state_dict_torchvision,
    load_backbone,
    load_sstl_backbone,
    read_weights_file,
)

# (backbone, its blocks stem first, feature width) from the model config and, for a state-dict file, its
# payload; `init` is False when an sstl checkpoint's backbone is copied in afterwards (weights ignored here)
Build = Callable[[ModelConfig, Any, bool], tuple[nn.Module, list[nn.Module], int]]


@dataclass(frozen=True)
class Family:
    """One way to build backbones: the arch names it owns, how it builds one, the pixels it expects."""

    name: str
    owns: Callable[[str], bool]  # whether an arch name is this family's (the first family that owns it wins)
    names: Callable[[], Iterable[str]]  # the names it knows, for `check_arch`'s suggestions
    data: Callable[[str], DataConfig]  # the preprocessing an arch of it expects
    build: Build


FAMILIES: list[Family] = []  # in resolution order; the last (timm) owns every name the others do not


def register_family(
    name: str, *, owns: Callable[[str], bool], names: Callable[[], Iterable[str]], data: Callable[[str], DataConfig]
) -> Callable[[Build], Build]:
    def add(build: Build) -> Build:
        FAMILIES.append(Family(name, owns, names, data, build))
        return build

    return add


def family_of(arch: str) -> Family:
    return next(f for f in FAMILIES if f.owns(arch))


@register_family("sstl", owns=CONVNETS.__contains__, names=lambda: CONVNETS, data=lambda _: DataConfig(input_size=32))
def _sstl_cnn(cfg: ModelConfig, payload: Any, init: bool) -> tuple[nn.Module, list[nn.Module], int]:
    if cfg.weights != "none" and init:
        raise SstlError(f"{cfg.arch} has no {cfg.weights} weights: use weights none, pretrain, or an sstl checkpoint")
    kind, widths = CONVNETS[cfg.arch]
    blocks, width = (airbench if kind == "airbench" else convnet)(cfg.widths or widths)
    return (sequential(blocks) if kind == "convnet" else max_pooled(blocks)), blocks, width


@register_family("torchvision", owns=ARCHS.__contains__, names=lambda: ARCHS, data=lambda _: DataConfig(input_size=224))
def _torchvision(cfg: ModelConfig, payload: Any, init: bool) -> tuple[nn.Module, list[nn.Module], int]:
    net = torchvision.models.get_model(cfg.arch, weights=None)
    if cfg.weights != "none" and init:
        state = (
            imagenet_state_dict_torchvision(cfg.arch) if cfg.weights == "imagenet" else file_state(payload, cfg.weights)
        )
        load_backbone(net, cfg.arch, cfg.weights, state)
    blocks, width = ARCHS[cfg.arch](net)
    return sequential(blocks), blocks, width


def _timm_name(arch: str) -> str:
    """`timm/<name>` names timm's model where torchvision has one of the same name; a bare name is timm's."""
    return arch.removeprefix("timm/")


@functools.cache
def _timm_models() -> frozenset[str]:
    return frozenset(timm.list_models())


def _timm_data(arch: str) -> DataConfig:
    """timm's pretrained data config of the model; ImageNet statistics where it has none."""
    cfg = timm.get_pretrained_cfg(_timm_name(arch))
    d = cfg.to_dict() if cfg is not None else {}
    interpolation = d.get("interpolation") or "bicubic"
    return DataConfig(
        mean=tuple(d.get("mean") or MEAN),
        std=tuple(d.get("std") or STD),
        input_size=int((d.get("input_size") or (3, 224, 224))[-1]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest", "lanczos") else "bicubic",
        fixed_input_size=bool(d.get("fixed_input_size", False)),
    )


@register_family("timm", owns=lambda _: True, names=_timm_models, data=_timm_data)
def _timm(cfg: ModelConfig, payload: Any, init: bool) -> tuple[nn.Module, list[nn.Module], int]:
    name = _timm_name(cfg.arch)
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    if cfg.weights != "none" and init:
        state = imagenet_state_dict(name) if cfg.weights == "imagenet" else file_state(payload, cfg.weights)
        load_backbone(backbone, cfg.arch, cfg.weights, state)
    return backbone, _timm_blocks(backbone), int(getattr(backbone, "num_features"))  # noqa: B009


def check_arch(arch: str) -> str:
    """`arch` if some family builds it; else one line naming the closest known names."""
    family = family_of(arch)
    if family.name != "timm" or _timm_name(arch) in _timm_models():
        return arch
    known = [name for f in FAMILIES for name in f.names()]
    close = difflib.get_close_matches(_timm_name(arch), known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for timm's names"
    raise SstlError(
        f"unknown arch {arch!r}: {hint} (torchvision: {', '.join(ARCHS)}; small CNNs: {', '.join(CONVNETS)}; "
        "or any timm model name)"
    )


def data_config(arch: str) -> DataConfig:
    """The preprocessing `arch` expects: timm's pretrained data config; ImageNet statistics otherwise."""
    return family_of(arch).data(arch)


def create_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build `cfg.arch`, then load its backbone weights.

    arch: a torchvision name (ARCHS), an sstl small CNN (CONVNETS), or any timm name (`timm/<name>`
    when torchvision has the same name). weights: `none`; `imagenet` (an installed weight package,
    else the torch / timm hub caches: see sstl.models.weights); a state-dict file; or an sstl checkpoint
    (e.g. the `pretrain` stage's), whose backbone is copied.
    """
    check_arch(cfg.arch)
    payload = read_weights_file(Path(cfg.weights)) if cfg.weights not in ("none", "imagenet") else None
    is_sstl = isinstance(payload, dict) and {"state_dict", "model"} <= set(payload)  # written by save_checkpoint
    sstl_ckpt: dict[str, Any] | None = payload if is_sstl else None
    backbone, blocks, width = family_of(cfg.arch).build(cfg, payload, sstl_ckpt is None)
    data = data_config(cfg.arch).model_copy(update={"resize": cfg.resize})
    taps = _taps(cfg, backbone, blocks)
    if taps:  # the head's width: the pooled features and the statistics of each tap stage
        width = _feature_width(Classifier(backbone, blocks, nn.Identity(), data, taps, cfg.tap_stats))
    model = Classifier(backbone, blocks, make_head(width, num_classes, cfg), data, taps, cfg.tap_stats)
    if sstl_ckpt is not None:
        load_sstl_backbone(model, sstl_ckpt, cfg)
    return model


def _taps(cfg: ModelConfig, backbone: nn.Module, blocks: list[nn.Module]) -> tuple[nn.Module, ...]:
    """The stages of the top `cfg.taps` groups, in order (`ModelConfig.taps`): each group's `stage_module`."""
    if not cfg.taps:
        return ()
    n = len(blocks)
    if cfg.taps >= n:
        raise SstlError(
            f"taps is {cfg.taps}, but {cfg.arch} has {n - 1} groups above its stem: set taps to at most {n - 1} "
            "(0: the pooled features alone)"
        )
    return tuple(stage_module(backbone, blocks, g) for g in range(n - cfg.taps, n))


def _feature_width(model: Classifier) -> int:
    """The width of `model.features` on one image of the backbone's input size (eval mode, no grad)."""
    side, training = model.data.resize or model.data.input_size, model.training
    with torch.no_grad():
        width = int(model.eval().features(torch.zeros(1, 3, side, side)).shape[1])
    model.train(training)
    return width


def _timm_blocks(net: nn.Module) -> list[nn.Module]:
    """timm's own coarse grouping (stem, stages, head convs), each group as one ModuleList."""
    groups = group_modules(net, net.group_matcher(coarse=True))  # type: ignore[operator]  # {group: [module names]}, in depth order
    named = dict(net.named_modules())
    return [nn.ModuleList([named[name] for name in names]) for _, names in sorted(groups.items())]
