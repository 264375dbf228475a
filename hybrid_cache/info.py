"""What the scheduler learns from the workers at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_cache.layout import CacheLayout


@dataclass(frozen=True)
class CostModel:
    """The K/V recompute cost, measured at start-up on the real device, dtype and shard.

    How it is measured: docs/ARCHITECTURE.md, "Cost model".

    Recomputing K/V of `t` history tokens through all layers takes about `fixed_seconds +
    seconds_per_token * t`; `alpha` is that per-token slope times the block size: the seconds one KV
    block's worth of hidden history adds to every step (the apt policy's `α`).
    """

    fixed_seconds: float
    seconds_per_token: float
    block_size: int

    @property
    def alpha(self) -> float:
        return self.seconds_per_token * self.block_size


@dataclass(frozen=True)
class WorkerInfo:
    """The model's limits, the cache that rank 0 allocated, and its measured recompute cost."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    layout: CacheLayout
    num_blocks: int
    cache_bytes: int  # blocks plus workspace, per rank
    cost: CostModel
