"""What the scheduler learns from the workers at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import BatchPlan, CacheType


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
class StepCostModel:
    """A whole step's duration, measured at start-up on the real device and dtype (KV requests only).

    How it is measured: docs/ARCHITECTURE.md, "Step-time model". A step that computes `tokens` new
    tokens whose queries attend `context` keys in all (a decode of a request holding `L` tokens
    attends `L` keys; a chunk of `k` tokens after `s` cached ones attends `k·s + k(k+1)/2`) takes about
    `intercept_seconds + seconds_per_token · tokens + seconds_per_context · context +
    seconds_per_sequence · sequences` (the last term: each sequence's own work, e.g. its attention
    call and its row of logits). The K/V recompute of hidden requests is not in it: `CostModel` adds that.
    """

    intercept_seconds: float
    seconds_per_token: float
    seconds_per_context: float
    seconds_per_sequence: float = 0.0

    def seconds(self, tokens: int, context: int, sequences: int = 0) -> float:
        """The predicted seconds of a step of `tokens` new tokens of `sequences` sequences attending
        `context` keys in all."""
        return (self.intercept_seconds + self.seconds_per_token * tokens + self.seconds_per_context * context
                + self.seconds_per_sequence * sequences)


def attended_keys(num_new: int, start: int) -> int:
    """Keys the queries of `num_new` tokens at positions `start..` attend in all (causal)."""
    return num_new * start + num_new * (num_new + 1) // 2


@dataclass
class StepLoad:
    """The features of a step being built: new tokens, attended keys, hidden history recomputed."""

    tokens: int = 0
    context: int = 0
    hidden_history: int = 0
    sequences: int = 0

    def add(self, num_new: int, start: int, hidden: bool) -> None:
        """Count a sequence computing `num_new` tokens after `start` cached ones."""
        self.sequences += 1
        self.tokens += num_new
        self.context += attended_keys(num_new, start)
        if hidden:
            self.hidden_history += start

    def plus(self, num_new: int, start: int, hidden: bool) -> StepLoad:
        """A copy with one more sequence counted."""
        load = StepLoad(self.tokens, self.context, self.hidden_history, self.sequences)
        load.add(num_new, start, hidden)
        return load

    @classmethod
    def of_plan(cls, plan: BatchPlan) -> StepLoad:
        load = cls()
        for seq in plan.seqs:
            load.add(seq.num_new, seq.start_pos, seq.cache_type is CacheType.HIDDEN)
        return load


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
    # None where no step was profiled (a fake or simulated executor): the apt policy then sizes
    # prompt chunks by the token budget alone.
    step_cost: StepCostModel | None = None
