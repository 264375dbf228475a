"""The plain data that crosses from the scheduler to the workers, once per step.

It lives below both `scheduler_service` and `worker` so that neither imports the other (DESIGN §3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CacheType(str, enum.Enum):
    """How a request keeps its history: K/V per token, or the layer inputs `x` (K/V recomputed)."""

    KV = "kv"
    HIDDEN = "hidden"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the fields follow vLLM's `SamplingParams`.

    `temperature == 0` is greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list arguments into tuples so params stay hashable.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True)
class Conversion:
    """Hidden→KV in place: project K/V of the first `num_tokens` tokens from `hidden_blocks` into `kv_blocks`."""

    hidden_blocks: list[int]
    kv_blocks: list[int]
    num_tokens: int


@dataclass
class SequencePlan:
    """One request's share of a step: compute `token_ids` at positions `start_pos..`, then sample one token.

    `start_pos` tokens are already in the cache (in `block_table`, of type `cache_type`).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    cache_type: CacheType
    block_table: list[int]
    sampling: SamplingParams
    conversion: Conversion | None = None

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class BatchPlan:
    """Everything a worker needs for one step. `finished_seq_ids` lets workers drop per-request state."""

    seqs: list[SequencePlan]
    finished_seq_ids: list[int] = field(default_factory=list)

