"""The plain data that crosses from the scheduler to the workers, once per step.

It lives below both `scheduler_service` and `worker` so that neither imports the other (the layering
in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# vLLM's convention: a temperature below this is greedy (normalised to exactly 0.0).
SAMPLING_EPS = 1e-5
# Seeds and top_k travel as int64 (`plan_codec`); the codec's -1 means "unseeded", so seeds are >= 0.
MAX_INT64 = 2**63 - 1
# OpenAI's bounds: at most 20 alternatives per token (`top_logprobs`), penalties in [-2, 2], a logit
# bias in [-100, 100].
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# Most parallel samples of one prompt (`n`, `best_of`): each is a running sequence with its own blocks.
MAX_SAMPLES = 64


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
    - `ignore_eos`, `include_stop_str_in_output`: bools (the latter keeps a matched stop string in the text).
    - `presence_penalty`, `frequency_penalty`: finite floats in [-2, 2], subtracted from the logit of
      every token already generated (once, or once per occurrence); 0 disables them.
    - `repetition_penalty`: a finite float > 0 (transformers' and vLLM's: the logit of every token in the
      prompt or the output is divided by it when positive, multiplied when negative); 1 disables it.
    - `logit_bias`: token id -> bias in [-100, 100], added to that token's logit; given as a mapping or
      pairs, kept as sorted `(token id, bias)` pairs (ids >= 0; the engine checks them against the vocabulary).
    - `min_p`: a finite float in [0, 1]: tokens less likely than `min_p` times the likeliest are dropped.
    - `min_tokens`: an int in [0, max_tokens]: EOS and `stop_token_ids` cannot be sampled, and stop
      strings do not end the request, before that many tokens.
    - `logprobs`: None, or how many alternatives (0..20) to report with each sampled token's log
      probability. Log probabilities are those of the model's raw logits (before penalties, bias and
      temperature), as vLLM reports by default.
    - `prompt_logprobs`: None, or the same for every prompt token after the first (given the tokens
      before it): what `echo` with `logprobs` reports.

    - `n`: an int in [1, 64]: parallel samples of the prompt returned (they share its prefill and its
      full prompt blocks; a seeded request's sample i is seeded `seed + i`).
    - `best_of`: None (= `n`) or an int in [n, 64]: samples generated, of which the `n` with the highest
      cumulative log probability are returned.

    Penalties, bias and `min_tokens` change the logits before the choice, so they apply to greedy
    requests too; `min_p`, like `top_p` and `top_k`, cannot change an argmax.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None

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
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        penalties = {name: _real(name, getattr(self, name)) for name in ("presence_penalty", "frequency_penalty")}
        for name, value in penalties.items():
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        min_p = _real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        min_tokens = _integer("min_tokens", self.min_tokens)
        if not 0 <= min_tokens <= max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={max_tokens}], got {self.min_tokens!r}")
        logprobs = None if self.logprobs is None else _integer("logprobs", self.logprobs)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        prompt_logprobs = None if self.prompt_logprobs is None else _integer("prompt_logprobs", self.prompt_logprobs)
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        n = _integer("n", self.n)
        if not 1 <= n <= MAX_SAMPLES:
            raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {self.n!r}")
        best_of = None if self.best_of is None else _integer("best_of", self.best_of)
        if best_of is not None and not n <= best_of <= MAX_SAMPLES:
            raise ValueError(f"best_of must be in [n={n}, {MAX_SAMPLES}], got {self.best_of!r}")
        if temperature < SAMPLING_EPS:  # greedy: the filters cannot change an argmax
            temperature, top_p, top_k, min_p = 0.0, 1.0, 0, 0.0
        return {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": max(top_k, 0),
            "seed": seed,
            "stop": _stop_strings(self.stop),
            "stop_token_ids": _stop_token_ids(self.stop_token_ids),
            **penalties,
            "repetition_penalty": repetition_penalty,
            "logit_bias": _logit_bias(self.logit_bias),
            "min_p": min_p,
            "min_tokens": min_tokens,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "n": n,
            "best_of": best_of,
        }

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Samples generated: `best_of`, else `n`."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties, a bias or `min_tokens` change this request's logits before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

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


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """Sorted (token id, bias) pairs from a mapping (JSON keys may be strings of digits) or pairs."""
    items = bias.items() if isinstance(bias, Mapping) else _sequence("logit_bias", bias)
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to numbers, got {item!r}")
        key, value = item
        if isinstance(key, str):
            if not key.strip().isdecimal():
                raise ValueError(f"logit_bias keys must be token ids (strings of digits), got {key!r}")
            key = int(key)
        token = _integer("logit_bias", key)
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids (>= 0), got {key!r}")
        number = _real("logit_bias", value)
        if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r}")
        pairs[token] = number
    return tuple(sorted(pairs.items()))


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

    `start_pos` tokens are already in the cache (in `block_table`, of type `cache_type`). `fork_of`
    names, on a forked sample's first step, the sequence whose first `start_pos` tokens it shares
    (the sampler copies that history: repetition penalties count the prompt). `prompt_logprobs`
    (set by the engine on the chunks of a prompt whose request asked) has the worker return the
    logprobs of these tokens, each given the tokens before it.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    cache_type: CacheType
    block_table: list[int]
    sampling: SamplingParams
    conversion: Conversion | None = None
    fork_of: int | None = None
    prompt_logprobs: int | None = None

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class BatchPlan:
    """Everything a worker needs for one step. `finished_seq_ids` lets workers drop per-request state.
    `block_copies` are `(src, dst)` blocks to copy whole before anything else in the step (the
    copy-on-write of a forked sample's last prompt block)."""

    seqs: list[SequencePlan]
    finished_seq_ids: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)



@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability under the model's raw logits, its rank (1: the likeliest),
    and the `SamplingParams.logprobs` likeliest tokens with theirs, likeliest first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


class SampledTokens(list):  # list[int]: what every executor returns, with optional extras
    """One sampled token id per sequence, in plan order: a plain list of ints, so every executor (and
    every stand-in) can return one; the model runner's also carries `logprobs`, per sequence a
    `TokenLogprobs` or None (not asked for), or None for the whole step when no sequence asked."""

    logprobs: list[TokenLogprobs | None] | None = None
    # Per sequence that set `SequencePlan.prompt_logprobs`, an entry per token it was fed this step
    # (None where unknown: the first token of the prompt); None for the others, or for the whole step.
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None = None

    def __init__(
        self,
        token_ids: Iterable[int],
        logprobs: list[TokenLogprobs | None] | None = None,
        prompt_logprobs: list[list[TokenLogprobs | None] | None] | None = None,
    ) -> None:
        super().__init__(token_ids)
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs

    def __reduce__(self) -> tuple[object, ...]:  # pickles (Ray) with its logprobs
        return (SampledTokens, (list(self), self.logprobs, self.prompt_logprobs))


def logprobs_of(tokens: Sequence[int]) -> list[TokenLogprobs | None] | None:
    """The per-sequence logprobs an executor returned with `tokens` (None: none asked for, or a plain list)."""
    return tokens.logprobs if isinstance(tokens, SampledTokens) else None


def prompt_logprobs_of(tokens: Sequence[int]) -> list[list[TokenLogprobs | None] | None] | None:
    """The per-sequence prompt logprobs an executor returned with `tokens` (None: none asked for)."""
    return tokens.prompt_logprobs if isinstance(tokens, SampledTokens) else None
