"""How the prepare stage treats the photos: near-duplicate search and test-add corruptions (torch-free)."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_THRESHOLDS = {"thumbnail": 0.97, "backbone": 0.95}


class NearDupConfig(BaseModel):
    """Near-duplicate removal of evaluation images from the unlabelled pool (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="drop unlabelled images that are near-duplicates of val/test/test-add")
    method: Literal["thumbnail", "backbone"] = Field(
        "thumbnail", description="thumbnail: RGB thumbnail correlation, no weights; backbone: pretrained features"
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="cosine similarity at or above which a pair is a duplicate (None: 0.97 "
        "for thumbnail, calibrated; 0.95 for backbone, a cautious start)",
    )
    thumb_size: int = Field(8, ge=2, le=64, description="thumbnail side, pixels (thumbnail method)")
    crop_scales: tuple[float, ...] = Field(
        (0.95, 0.9), description="side shares of the crops each evaluation image is also matched as; () = none"
    )
    arch: str = Field("resnet18", description="backbone arch (backbone method)")
    weights: str = Field("imagenet", description="imagenet or a state-dict file (backbone method)")
    batch_size: int = Field(256, ge=1, description="images turned into features at a time")
    block_size: int = Field(512, ge=1, description="pool rows x evaluation images compared at a time")

    @model_validator(mode="after")
    def _check(self) -> NearDupConfig:
        if any(not 0.5 <= s < 1.0 for s in self.crop_scales):
            raise ValueError(f"crop_scales must lie in [0.5, 1), got {list(self.crop_scales)}")
        if self.method == "backbone" and self.weights == "none":
            raise ValueError("method backbone needs weights (imagenet or a file): random weights match nothing")
        return self

    def cutoff(self) -> float:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.method]

    def n_views(self, reference: bool) -> int:
        return 1 + len(ANCHORS) * len(self.crop_scales) if reference else 1


Kind = Literal["gaussian_blur", "gaussian_noise", "jpeg", "contrast"]
KINDS: tuple[Kind, ...] = ("gaussian_blur", "gaussian_noise", "jpeg", "contrast")


class CorruptConfig(BaseModel):
    """Build test-add from the test images under these corruptions (when the folder has no test-add/)."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS))
    severity: int = Field(3, ge=1, le=5)
    seed: int = Field(0, ge=0)


ANCHORS = tuple(itertools.product((0.0, 1 / 3, 2 / 3, 1.0), repeat=2))  # (top, left), shares of the free margin
