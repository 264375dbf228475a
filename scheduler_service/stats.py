"""`EngineStats`: the snapshot of an engine's state that every layer above reads (the serving layer's
metrics, the router's health view, the offline `LLM`)."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_cache.manager import CacheUsage
from scheduler_service.metrics import EngineMetrics
from scheduler_service.step_time import StepTimeReport


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state and what it knows about its cache."""

    policy: str
    cache_mode: str  # the mode in effect (hybrid runs as kv when the hidden cache cannot help)
    num_running: int
    num_waiting: int
    cache: CacheUsage
    num_steps: int
    num_preemptions: int
    num_conversions: int
    num_failed_steps: int  # steps that failed (the requests they touched ended with an error, or were preempted)
    tokens_by_cache_type: dict[str, int]  # generated tokens, by the cache type their request held
    # Cumulative seconds: engine-side `scheduling` and `execute` (the executor call, Ray included), and the
    # executor's `model` (rank 0's forward and sampling), `attention` (within model), `recompute` (within attention).
    step_seconds: dict[str, float]
    block_size: int
    hidden_tokens_per_block: int | None
    ratio: float  # r: hidden bytes per token over KV bytes per token
    kv_bytes_per_token_per_layer: int
    hidden_bytes_per_token_per_layer: int
    cache_bytes: int
    num_rejected: dict[str, int]  # requests refused by add_request, by reason: invalid or queue_full
    alpha: float  # seconds of K/V recompute per block of hidden history per step (measured or configured)
    recompute_fixed_seconds: float
    metrics: EngineMetrics  # a copy: counters and latency histograms for Prometheus
    # Steps where the policy raised or scheduled nothing with work pending, and FCFS decided instead:
    # zero unless a policy has a bug (the soak test asserts it).
    num_policy_fallbacks: int = 0
    # False once the engine loop has stopped (shut down, or failed beyond recovery): the numbers above
    # are then the last ones, not a live engine's. The serving layer renders it as an `up` gauge.
    healthy: bool = True
    # The start-up step-time model (None without one) and its predictions against the measured time
    # of each step's executor call.
    step_time: StepTimeReport = StepTimeReport(None)
    # Prompts prefilled: requests admitted from the waiting queue (re-admissions after preemption
    # included; a forked sample shares its prompt's prefill and is not), and parallel samples forked.
    num_prefills: int = 0
    num_forked_samples: int = 0
