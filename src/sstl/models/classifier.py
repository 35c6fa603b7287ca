"""The Classifier (backbone -> pooled features -> MLP head) and the helpers that set which of its blocks train."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sstl.config.model import DataConfig, ModelConfig
from sstl.models.architectures import Whiten

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Classifier(nn.Module):
    """backbone (N, 3, H, W) -> (N, D) pooled features -> head -> (N, C) logits.

    `blocks` are the backbone's module groups, stem first, top last: what transfer learning freezes
    and unfreezes (not registered twice: they are views into `backbone`). `data` says how to turn
    uint8 pixels into the backbone's input (`preprocess`), so training, inference and `predict`
    cannot normalise differently.
    """

    def __init__(
        self,
        backbone: nn.Module,
        blocks: list[nn.Module],
        head: nn.Module,
        data: DataConfig,
        taps: tuple[nn.Module, ...] = (),
        tap_stats: str = "std",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.data = data
        self.blocks: tuple[nn.Module, ...] = tuple(blocks)  # a plain attribute: state_dict holds them once
        self.taps = taps  # backbone stages whose outputs' statistics the head also reads (ModelConfig.taps)
        self.tap_stats = tap_stats  # which: "std" or "mean_std" over space, per channel
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

    def features(self, x: torch.Tensor, *, given: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) pooled features; with `taps`, followed by each tap
        stage's statistics (`tap_statistics`), in forward order.

        `given` (N, S): the statistics of the taps below a consistency student's cut, computed once per
        view (sstl.train.consistency): the forward then starts at the cut, and those taps see no rows."""
        if not self.taps:
            return self.backbone(x)
        with self.tapped() as seen:
            pooled = self.backbone(x)
        if given is None:
            return torch.cat([pooled, *self.tap_statistics(seen)], 1)
        live = [a for a in seen if a.shape[0]]  # the taps at or above the cut
        return torch.cat([pooled, given.to(pooled.dtype), *self.tap_statistics(live)], 1)

    @contextmanager
    def tapped(self) -> Iterator[list[torch.Tensor]]:
        """Within: each tap stage's output [(N, C_i, h, w)], appended in forward order as the backbone runs."""
        seen: list[torch.Tensor] = []
        handles = [tap.register_forward_hook(lambda _m, _a, out: seen.append(out)) for tap in self.taps]
        try:
            yield seen
        finally:
            for handle in handles:
                handle.remove()

    def tap_statistics(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tap stages' outputs [(N, C_i, h, w)] -> [(N, S_i)]: per channel, the std over space (with
        `tap_stats` mean_std, the mean first), each stage's vector standardised per photo: a mid-level
        activation's scale (several times the pooled features') would otherwise drown the pooled features."""
        parts = []
        for a in acts:
            s = a.std((2, 3), correction=0)
            s = torch.cat([a.mean((2, 3)), s], 1) if self.tap_stats == "mean_std" else s
            parts.append(F.layer_norm(s, s.shape[1:]))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pixels(data: DataConfig) -> dict[str, Any]:
    """What preprocessing does to a batch under `data`: the side a backbone was trained at is left out
    unless it is fixed (images reach every member at the prepared side; Lite0 and Lite1 take the same)."""
    return data.model_dump(exclude=set() if data.fixed_input_size else {"input_size"})


class Ensemble(Classifier):
    """Several classifiers of one backbone's preprocessing as one: the mean of their distributions, as
    logits (log of the mean softmax, so softmax gives it back); features are the first member's.

    The pseudolabel stage's teacher with its backbone's frozen-feature probe (`pseudolabel.with_probe`):
    a network fine-tuned on a few dozen labels and a regression on frozen features err on different photos.
    """

    def __init__(self, members: list[Classifier]) -> None:
        first, *others = members
        if any(_pixels(m.data) != _pixels(first.data) for m in others):
            raise ValueError("an ensemble's members must preprocess alike (the same normalisation and resizing)")
        super().__init__(first.backbone, list(first.blocks), first.head, first.data, first.taps, first.tap_stats)
        self.others = nn.ModuleList(others)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [super().forward(x), *(m(x) for m in self.others)]  # each (N, C)
        logp = torch.stack([F.log_softmax(z.float(), 1) for z in logits])  # (members, N, C)
        return torch.logsumexp(logp, 0) - math.log(len(logits))


def stage_module(backbone: nn.Module, blocks: list[nn.Module], group: int) -> nn.Module:
    """The largest module of `backbone` that starts `blocks[group]` and holds nothing of the groups below
    it: the whole stage (EfficientNet's `blocks.5` for group 6, ResNet's `layer3`), so that no residual
    reaches across its input or its output. A consistency student cuts before it; a tap reads its output."""
    modules = dict(backbone.named_modules())
    names = {id(m): name for name, m in modules.items()}
    below = {names[id(m)] for block in blocks[:group] for m in block.modules() if id(m) in names}
    first = blocks[group]
    if id(first) not in names:  # timm's groups: a list of the backbone's modules, not one of them
        first = next(m for m in first.modules() if id(m) in names)
    chosen = names[id(first)]
    parts = chosen.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if any(b == prefix or b.startswith(prefix + ".") for b in below):
            break
        chosen = prefix
    return modules[chosen]


def make_head(in_dim: int, num_classes: int, cfg: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(cfg.head_layers):
        layers += [nn.Dropout(cfg.dropout), nn.Linear(width, cfg.hidden_size), ACTIVATIONS[cfg.activation]()]
        width = cfg.hidden_size
    layers += [nn.Dropout(cfg.dropout), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


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


def model_digest(model: nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes): which network scored or featured a set."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
