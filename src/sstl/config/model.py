"""What a network is (ModelConfig) and how pixels must reach it (DataConfig): torch-free, for params and checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ImageNet statistics: the input scale of torchvision's backbones and sstl's small CNNs; timm backbones bring theirs.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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
    taps: int = Field(
        0,
        ge=0,
        le=16,
        description="the head also reads per-channel statistics over space of the outputs of the backbone's top "
        "`taps` stages (its groups' whole modules: EfficientNet-Lite, 5: blocks.2 to blocks.6), each standardised per "
        "photo, beside the pooled features: mid-level features that still transfer where ImageNet's top ones do not "
        "(Head2Toe, Evci et al. 2022)",
    )
    tap_stats: Literal["std", "mean_std"] = Field(
        "std",
        description="which statistics a tap gives: the std over space per channel (texture and contrast, as in style "
        "transfer's statistics), or the mean too",
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
