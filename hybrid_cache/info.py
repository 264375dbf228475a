"""What the scheduler learns from the workers at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_cache.layout import CacheLayout


@dataclass(frozen=True)
class WorkerInfo:
    """The model's limits and the cache that rank 0 allocated."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    layout: CacheLayout
    num_blocks: int
    cache_bytes: int  # blocks plus workspace, per rank
