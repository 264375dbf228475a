"""The simulator's one entry point: a typed configuration in, per-request records out.

    from bench.simulator.api import SimConfig, simulate
    result = simulate(SimConfig(profile="a100-80g/opt-13b", tp=1, policy="fcfs", cache="kv"), workload)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.simulator.factory import build_step_time, capacity_tokens
from bench.simulator.hardware import Profile, parse_profile
from bench.simulator.loop import SimResult, TraceRequest, build_engine, run
from hybrid_cache.layout import CacheLayout
from scheduler_service.config import SchedulerConfig


class SimConfig(BaseModel):
    """What to simulate: hardware and model, the engine's settings, and the step-time model."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field("a100-80g/opt-13b", description="DEVICE/MODEL, e.g. a100-80g/opt-66b or cpu/opt-125m")
    tp: int = Field(1, gt=0, description="tensor-parallel GPUs")
    policy: Literal["fcfs", "apt"] = "fcfs"
    cache: Literal["kv", "hybrid", "hidden"] = "kv"
    step_model: Literal["fitted", "roofline", "measured"] = "fitted"
    recompute: Literal["vidur", "roofline"] = Field("vidur", description="source of the hidden recompute time")
    block_size: int = Field(16, gt=0, description="tokens per KV block (vLLM's GPU default is 16)")
    num_blocks: int | None = Field(None, gt=0, description="cache blocks; None: the model's capacity")
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0, description="None: the context length")
    max_model_len: int | None = Field(None, gt=0, description="None: the model's context length")
    ttft_slo_s: float = Field(5.0, gt=0, description="the SLOs the apt policy schedules by")
    tbt_slo_s: float = Field(1.0, gt=0)
    host_per_seq_ms: float = Field(0.0, ge=0, description="fitted/measured: host cost per decoding sequence per step")
    prefill_ms: tuple[float, float, float] | None = Field(None, description="fitted/measured: other prefill (a, b, c)")
    recompute_chunk_tokens: int = Field(2048, gt=0, description="the hidden cache's workspace, reserved in hybrid")
    scheduler: dict = Field(default_factory=dict, description="other SchedulerConfig fields")

    def parsed_profile(self) -> Profile:
        return parse_profile(self.profile)


def layout_for(profile: Profile, tp: int, block_size: int) -> CacheLayout:
    """One rank's cache layout for the model at TP `tp` (16-bit values)."""
    m = profile.model
    if m.num_heads % tp or m.num_kv_heads % tp:
        raise ValueError(f"{m.name} has {m.num_heads} heads: not divisible by TP {tp}")
    return CacheLayout(num_layers=m.num_layers, hidden_size=m.hidden_size // tp, num_kv_heads=m.num_kv_heads // tp,
                       head_dim=m.head_dim, block_size=block_size, dtype_bytes=2)


def num_blocks_for(config: SimConfig, profile: Profile, layout: CacheLayout) -> int:
    """Blocks of the configured budget, or of the model's capacity; the hybrid modes reserve the
    recompute workspace inside it, as the engine does."""
    if config.num_blocks is not None:
        return config.num_blocks
    tokens = capacity_tokens(config.step_model, profile, config.tp)
    if tokens is None:
        raise ValueError("the measured model needs num_blocks (the CPU engine's budget)")
    budget = tokens * layout.block_bytes // layout.block_size
    if config.cache == "kv" or not layout.hidden_allowed:
        return budget // layout.block_bytes
    return layout.num_blocks_for_budget(budget, config.recompute_chunk_tokens)


def simulate(config: SimConfig, workload: Sequence[TraceRequest], progress: bool = False) -> SimResult:
    """Run `workload` through the production scheduler on the virtual clock; one record per request."""
    profile = config.parsed_profile()
    layout = layout_for(profile, config.tp, config.block_size)
    model = build_step_time(config.step_model, profile, config.tp, config.recompute, config.host_per_seq_ms,
                            config.prefill_ms)
    max_len = config.max_model_len or profile.model.max_model_len
    scheduler = SchedulerConfig(
        policy=config.policy, cache_mode=config.cache, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens or max_len, max_waiting=None,
        ttft_slo_s=config.ttft_slo_s, tbt_slo_s=config.tbt_slo_s, **config.scheduler,
    )
    engine, executor, clock = build_engine(scheduler, layout, num_blocks_for(config, profile, layout), max_len,
                                           profile.model.vocab_size, model)
    return run(engine, executor, clock, workload, progress, desc=f"{config.policy}/{config.cache}")
