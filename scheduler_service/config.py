"""Typed settings of scheduling (a section of the YAML config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CacheMode = Literal["kv", "hidden", "hybrid"]


class SchedulerConfig(BaseModel):
    """Which policy picks each batch, with which cache types, under which per-step limits."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["fcfs"] = Field("fcfs", description="scheduling policy")
    cache_mode: CacheMode = Field(
        "kv", description="kv: K/V only; hidden: x only; hybrid: the policy picks per request"
    )
    max_num_seqs: int = Field(256, gt=0, description="most requests in one step")
    max_num_batched_tokens: int | None = Field(
        None, gt=0, description="most tokens in one step; None means the model's context length"
    )
    conversion_free_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="hybrid FCFS converts a hidden request to KV only if this share of blocks stays free after",
    )
