"""How pseudo-labels are selected from the teacher's predictions on the pool (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sstl.config.runtime import TTA_HELP, Tta


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["topk", "threshold"] = "topk"
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="tau for method=threshold")
    top_k: int = Field(100, ge=1, description="K images per class for method=topk")
    top_p: int = Field(1, ge=1, description="P classes per image for method=topk")
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(
        8192, ge=1, description="images per shard: the unit of resume (state saved after each) and of work per process"
    )
    tta: Tta = Field("none", description=TTA_HELP)
    balance: Literal["none", "labelled", "pool"] = Field(
        "none",
        description="keep each class's share of the selection at most its prior: labelled = the labelled rows' "
        "class shares, pool = the teacher's mean distribution over the pool (a skewed confident set cannot tilt the "
        "student); none = as selected",
    )
    ood_quantile: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="drop selected pool images less similar to their nearest labelled photo (cosine, the teacher's "
        "features) than this quantile of val photos are (0.05: 95% of val passes); listed in ood.csv; null: off",
    )
    with_probe: bool = Field(
        False,
        description="score the pool with the mean of the teacher's distribution and its backbone's frozen-feature "
        "probe's (models/probes: the same labelled rows), not the teacher's alone: the fine-tuned network and the "
        "regression on frozen features err on different photos (needs probe.enabled)",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="softmax temperature of the soft targets (the stage's --probs); not of the selection"
    )
