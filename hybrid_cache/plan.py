"""The plain data that crosses from the scheduler to the workers, once per step.

It lives below both `scheduler_service` and `worker` so that neither imports the other (the layering
in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

# vLLM's convention: a temperature below this is greedy (normalised to exactly 0.0).
SAMPLING_EPS = 1e-5
# Seeds and top_k travel as int64 (`plan_codec`); the codec's -1 means "unseeded", so seeds are >= 0.
MAX_INT64 = 2**63 - 1


class CacheType(str, enum.Enum):
    """How a request keeps its history: K/V per token, or the layer inputs `x` (K/V recomputed)."""

    KV = "kv"
    HIDDEN = "hidden"


def _integer(name: str, value: object) -> int:
    """`value` as an int; bools, floats and strings are refused (JSON's `true` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(name: str, value: object) -> float:
    """`value` as a finite float; bools, strings, NaN and ±inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the fields and conventions follow vLLM's `SamplingParams`.

    This is the one validation of sampling values (HTTP, gRPC and the offline `LLM` all build one):
    construction raises ValueError naming the first bad field, and normalises what it accepts, so
    that every accepted value survives `plan_codec` unchanged and the sampler only sees safe values:

    - `max_tokens`: an int >= 1.
    - `temperature`: a finite float >= 0; below `SAMPLING_EPS` it becomes 0.0 (greedy), and a greedy
      request's `top_p`/`top_k` become 1.0/0 (they cannot change an argmax).
    - `top_p`: a finite float in (0, 1]; 1 disables it.
    - `top_k`: an int >= -1 (and <= 2**63 - 1); -1 and 0 disable it (-1 is normalised to 0).
    - `seed`: None (unseeded) or an int in [0, 2**63 - 1].
    - `stop`: non-empty strings; `stop_token_ids`: ints >= 0 (the engine checks them against the vocabulary).
    - `ignore_eos`: a bool.
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
        # Frozen dataclass: normalised values are written with object.__setattr__.
        for name, value in self._normalised().items():
            object.__setattr__(self, name, value)

    def _normalised(self) -> dict[str, object]:
        """Every field checked and in canonical form; raises ValueError naming the first bad one."""
        max_tokens = _integer("max_tokens", self.max_tokens)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        top_p = _real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        top_k = _integer("top_k", self.top_k)
        if not -1 <= top_k <= MAX_INT64:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer below 2**63, got {self.top_k!r}")
        seed = None if self.seed is None else _integer("seed", self.seed)
        if seed is not None and not 0 <= seed <= MAX_INT64:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if temperature < SAMPLING_EPS:  # greedy: the filters cannot change an argmax
            temperature, top_p, top_k = 0.0, 1.0, 0
        return {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": max(top_k, 0),
            "seed": seed,
            "stop": _stop_strings(self.stop),
            "stop_token_ids": _stop_token_ids(self.stop_token_ids),
        }

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (construction already did: kept for callers)."""
        self._normalised()


def _stop_strings(stop: object) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else _sequence("stop", stop)
    for s in strings:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return tuple(strings)


def _stop_token_ids(ids: object) -> tuple[int, ...]:
    tokens = tuple(_integer("stop_token_ids", token) for token in _sequence("stop_token_ids", ids))
    for token in tokens:
        if token < 0:
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {token!r}")
    return tokens


def _sequence(name: str, value: object) -> tuple[object, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return tuple(value)


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

