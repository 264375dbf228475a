"""Typed settings of scheduling (a section of the YAML config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CacheMode = Literal["kv", "hidden", "hybrid"]


class SchedulerConfig(BaseModel):
    """Which policy picks each batch, with which cache types, under which per-step limits."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["fcfs", "apt"] = Field(
        "fcfs", description="fcfs (vLLM-like) or apt (adaptive, see docs/ARCHITECTURE.md)"
    )
    cache_mode: CacheMode = Field(
        "kv", description="kv: K/V only; hidden: x only; hybrid: the policy picks per request"
    )
    max_num_seqs: int = Field(256, gt=0, description="most requests in one step")
    max_model_len: int | None = Field(
        None, gt=0, description="the longest context served (prompt plus output); None: the model's own. "
        "Larger than the model's is refused at start-up"
    )
    max_num_batched_tokens: int | None = Field(
        None,
        gt=0,
        description="most tokens in one step; None means the model's context length. A longer prompt is "
        "prefilled in chunks over several steps",
    )
    mixed: bool = Field(
        True,
        description="apt: a step carries decodes and prompt chunks together; false keeps the paper's structure "
        "(each step prefills or decodes, whichever chosen group has waited longer) for the ablation",
    )
    step_time_headroom: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="apt (mixed): prompt tokens join a step only while its predicted time stays within this "
        "share of the tightest time-between-tokens budget of the on-time running requests",
    )
    min_chunk_tokens: int = Field(
        16,
        gt=0,
        description="apt (mixed): a prompt chunk that the time budget would cut shorter than this (and shorter "
        "than the rest of its prompt) waits for a later step instead: a tiny chunk costs a step's fixed work",
    )
    step_error_window: int = Field(
        1024, gt=0, description="the last this many steps give the median error of the predicted step time "
        "(and, with step_time_adapt, its correction)"
    )
    step_time_adapt: bool = Field(
        True, description="scale the start-up step-time model by the median measured ÷ predicted ratio of the "
        "recent steps (the profile is a best case; a loaded server steps slower)"
    )
    max_waiting: int | None = Field(
        4096, gt=0, description="most requests waiting; more are rejected (HTTP 503). None: unbounded"
    )
    ttft_slo_s: float = Field(5.0, gt=0, description="default time-to-first-token SLO (per-request override)")
    tbt_slo_s: float = Field(1.0, gt=0, description="default time-between-tokens SLO (per-request override)")
    recompute_seconds_per_block: float | None = Field(
        None, ge=0, description="apt's alpha; None uses the cost measured at start-up"
    )
    pending_floor_s: float = Field(
        1e-3, gt=0, description="apt adds this to every pending time so a request that just arrived still counts"
    )
    violator_density: float = Field(
        1e-6, gt=0, description="apt's value per block for requests already past an SLO: served only with spare room"
    )
    growth_reserve_tokens: int = Field(
        16, ge=0, description="apt admits new requests only into blocks left after every running one grows this much"
    )
    conversion_free_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="hybrid FCFS converts a hidden request to KV only if this share of blocks stays free after",
    )
    caller_timeout_s: float = Field(
        60.0,
        gt=0,
        description="an engine replica's caller (an ingress) that neither polls nor adds a request for this long "
        "is presumed gone: its requests are aborted (reason 'server') and its undelivered outputs dropped",
    )
