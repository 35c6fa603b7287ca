"""Model factory: a backbone (torchvision, timm, or sstl's small CNNs) plus a small MLP head.

`create_model(cfg, num_classes)` is the one way to build a network; an unknown arch fails with the
closest names. The backbone's module groups are kept in order (stem first) so that transfer learning
can freeze all of it and later unfreeze the top `n` blocks; the preprocessing the backbone expects
(mean, std, input size, interpolation: timm's data config) travels with the model and its checkpoint.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import timm
import torchvision
from timm.models import group_modules
from torch import nn

from sstl.config.model import MEAN, STD, DataConfig, ModelConfig
from sstl.core.errors import SstlError
from sstl.models.architectures import ARCHS, CONVNETS, airbench, convnet, max_pooled, sequential
from sstl.models.classifier import Classifier, make_head
from sstl.models.weights import (
    _file_state,
    _imagenet_state_dict,
    _load_backbone,
    _load_sstl_backbone,
    _read_weights_file,
    imagenet_state_dict,
)


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


def create_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build `cfg.arch`, then load its backbone weights.

    arch: a torchvision name (ARCHS), an sstl small CNN (CONVNETS), or any timm name (`timm/<name>`
    when torchvision has the same name). weights: `none`; `imagenet` (an installed weight package,
    else the torch / timm hub caches: see sstl.models.weights); a state-dict file; or an sstl checkpoint
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
        backbone = sequential(blocks) if family == "convnet" else max_pooled(blocks)
    elif timm_name is None:
        net = torchvision.models.get_model(cfg.arch, weights=None)
        if cfg.weights != "none" and sstl_ckpt is None:
            state = _imagenet_state_dict(cfg.arch) if cfg.weights == "imagenet" else _file_state(payload, cfg.weights)
            _load_backbone(net, cfg.arch, cfg.weights, state)
        blocks, width = ARCHS[cfg.arch](net)
        backbone = sequential(blocks)
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
