"""How networks are trained: the schedule, augmentation, pretext pretraining and the tune search space (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from skopt.space import Dimension


class TrainConfig(BaseModel):
    """How a network is trained. Epoch counts are maxima: early stopping may end a phase sooner."""

    model_config = ConfigDict(extra="forbid")

    head_epochs: int = Field(3, ge=0, description="phase 1: head only, backbone frozen")
    epochs: int = Field(15, ge=0, description="phase 2: top blocks unfrozen")
    lr: float = Field(1e-3, gt=0.0, le=100.0)
    finetune_lr: float = Field(3e-4, gt=0.0, le=100.0)
    unfreeze_blocks: int = Field(5, ge=0, description="top backbone blocks trained in phase 2")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "sgd"] = Field("adam", description="sgd: Nesterov momentum `momentum`")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd's momentum")
    lr_schedule: Literal["plateau", "linear"] = Field(
        "plateau",
        description="plateau: LR x0.1 on a val plateau, early stopping, best weights kept; linear: warm-up from "
        "0.2 x lr over `warmup` of the steps, then linear decay to 0.07 x lr, all epochs, last weights kept",
    )
    warmup: float = Field(0.23, ge=0.0, lt=1.0, description="linear: share of the steps spent warming up")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    lookahead: bool = Field(
        False, description="every 5 steps the weights restart from their running average (airbench's Lookahead)"
    )
    bias_lr_scale: float = Field(
        1.0, gt=0.0, description="LR multiplier of biases and BatchNorm shifts (their weight decay divided by it)"
    )
    patience: int = Field(4, ge=1, description="early stopping: epochs without val-loss improvement")
    plateau_patience: int = Field(2, ge=0, description="epochs without improvement before LR x0.1")
    freeze_bn: bool = Field(
        False, description="BatchNorm keeps its pretrained statistics in phase 2 (few photos, strong augmentation)"
    )
    monitor: Literal["val_loss", "val_acc"] = Field(
        "val_loss",
        description="what early stopping, LR drops and the kept weights follow; val_acc (ties: lower loss) "
        "suits pseudo-labelled training, whose val loss rises with confidence while accuracy still improves",
    )


class AugmentConfig(BaseModel):
    """Strong augmentation for the student (Noisy Student's input noise). 0 turns a layer off.

    hflip, translate and erase run batched on the device; crop_scale, rotate, color and blur_noise
    run per image with albumentations on the CPU (see the module's docstring).
    """

    model_config = ConfigDict(extra="forbid")

    hflip: bool = Field(True, description="random horizontal flips, p=0.5 (off for digits, text, ...); batched")
    crop_scale: float = Field(
        0.6, gt=0.0, le=1.0, description="min area kept by random resized crops (1: none); per image"
    )
    rotate: float = Field(15.0, ge=0.0, le=180.0, description="max rotation, degrees (p=0.7); per image")
    translate: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="max shift, fraction of the side: a random window of the image reflect-padded by "
        "round(translate * side) pixels; batched",
    )
    color: float = Field(0.4, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter; per image")
    blur_noise: float = Field(0.3, ge=0.0, le=1.0, description="probability of blur or noise; per image")
    erase: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="probability of cutout: one square hole (side 0.2-0.4 of the image, random centre, "
        "clipped at the border) set to 0; batched",
    )
    head_phase: bool = Field(
        True, description="augment phase 1 too; false trains the head on cached backbone features (far faster)"
    )

    @property
    def per_image(self) -> bool:
        """Whether any layer needs the per-image albumentations part."""
        return self.crop_scale < 1.0 or self.rotate > 0 or self.color > 0 or self.blur_noise > 0


class ConsistencyConfig(BaseModel):
    """The consistency student (`student.method: fixmatch`): FixMatch on cached activations of the frozen
    bottom of the backbone, its top `unfreeze_blocks` groups and the head trained (sstl.train.consistency).

    Each unlabelled photo's weak view (as is, or mirrored) is scored; its prediction, aligned to the
    pool's class distribution, is the target of one of its strong views when confident enough."""

    model_config = ConfigDict(extra="forbid")

    strong_views: int = Field(
        2,
        ge=1,
        le=16,
        description="strongly augmented views per unlabelled photo, computed once (memory: views x pool)",
    )
    flip: bool = Field(
        True, description="the mirror image is a weak view too (2 weak views per photo); off for digits, text"
    )
    threshold: float = Field(0.95, gt=0.0, lt=1.0, description="FixMatch's confidence threshold tau")
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the strong view's target: 0, the weak view's class (FixMatch's hard label); T > 0, the weak "
        "view's aligned distribution sharpened at T (p^(1/T), renormalised: UDA, MixMatch), under the same mask",
    )
    flex: bool = Field(
        True, description="FlexMatch: each class's threshold scaled by how much of the pool it has learnt (warm-up)"
    )
    flex_prior: bool = Field(
        False,
        description="FlexMatch's learning effect per class divided by its expected count (the prior below): on an "
        "imbalanced pool a rare class's threshold then rises as it is learnt, not stays near 0",
    )
    align: bool = Field(
        True, description="distribution alignment: weak predictions rescaled to the pool prior the head starts with"
    )
    unlabeled_ratio: int = Field(2, ge=1, le=16, description="mu: unlabelled photos per labelled one in a batch")
    weight: float = Field(1.0, ge=0.0, description="lambda_u: weight of the unlabelled (consistency) loss")
    distill: float = Field(
        0.0, ge=0.0, description="weight of the teacher's soft pseudo-labels (its selected photos) on the strong views"
    )
    probe_head: bool = Field(
        True, description="start the head at the frozen-feature probe (C by CV), not at random (linear heads)"
    )
    pseudo_head: bool = Field(
        False,
        description="DST's pseudo head (Wang et al. 2022): the strong views' losses (consistency, distill) train a "
        "second head on the shared top groups, started as the first; the model's head learns from the labels only "
        "and makes the targets, so it never learns its own wrong guesses back. The second head is dropped at the end",
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="mean teacher: the weak views' targets come from, and the model kept is, a running average of "
        "the trained weights with this decay per step (0: the trained weights themselves)",
    )
    ood_quantile: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="screen the pool before training: a photo whose nearest labelled photo (the starting backbone's "
        "features) is further than for this share of val is of no known class and never enters the loss; listed "
        "in reports/ood/<student>.csv. null: every photo trains",
    )


# airbench's CIFAR-10 recipe (flip + 2 px translation at 32 px): light, and all of it batched
AIRBENCH = AugmentConfig(hflip=True, crop_scale=1.0, rotate=0.0, translate=0.0625, color=0.0, blur_noise=0.0, erase=0.0)


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="off: the stage writes a marker and weights: pretrain is refused")
    arch: str = "convnet_s"
    epochs: int = Field(5, ge=1)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    batch_size: int = Field(128, ge=1)
    max_images: int = Field(0, ge=0, description="pool images used (seeded sample); 0 = all")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)


class SpaceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    low: int | float | None = None  # int | float keeps YAML's 0 apart from 0.0: ints give an Integer range
    high: int | float | None = None
    prior: Literal["uniform", "log-uniform"] = "uniform"
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        if self.values is not None:
            if self.low is not None or self.high is not None or not self.values:
                raise ValueError("give either a non-empty `values` list or `low` and `high`")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give `low` < `high`, or a `values` list")
        elif self.prior == "log-uniform" and self.low <= 0:
            raise ValueError("log-uniform needs low > 0")
        return self

    def dimension(self, name: str) -> Dimension:
        from skopt.space import Categorical, Integer, Real  # here, not at the top: scikit-learn's import
        #   (about 1.3 s) would be paid by every stage that validates params, and only tune searches

        if self.values is not None:
            return Categorical(self.values, name=name)
        assert self.low is not None and self.high is not None
        if isinstance(self.low, int) and isinstance(self.high, int):
            return Integer(self.low, self.high, prior=self.prior, name=name)
        return Real(self.low, self.high, prior=self.prior, name=name)
