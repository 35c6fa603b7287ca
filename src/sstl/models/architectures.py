"""sstl's own small backbones (convnet_*, airbench_*) and the torchvision backbones' cut into blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


class Scale(nn.Module):
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


# arch name -> (family, channel widths of the three groups); no pretrained weights exist for these
CONVNETS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "convnet_s": ("convnet", (32, 64, 128)),
    "convnet_m": ("convnet", (48, 96, 192)),
    "convnet_l": ("convnet", (64, 128, 256)),
    "airbench_s": ("airbench", (32, 128, 128)),  # a quarter of airbench94's compute
    "airbench_m": ("airbench", (48, 192, 192)),
    "airbench_l": ("airbench", (64, 256, 256)),  # airbench94
}


def sequential(blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def max_pooled(blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(1), nn.Flatten(1), Scale(1 / 9))
