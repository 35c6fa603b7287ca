"""How `sstl serve` guards itself: body, image and concurrency limits (params.yaml's serve section; torch-free)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_mb: float = Field(32.0, gt=0.0, le=1024.0, description="request body limit: 413 over it, before reading")
    max_pixels: int = Field(
        50_000_000, ge=1, description="width x height an image may decode to (a 48 MP phone photo fits): 413 over it"
    )
    max_images: int = Field(256, ge=1, description="images one request may hold")
    max_concurrent: int = Field(4, ge=1, le=64, description="requests handled at once; more get 503 at once")
