"""A request's state as it moves through the engine.

    waiting ──admit──▶ running ──stop/length──▶ finished
       ▲                  │  └────abort────────▶ aborted (also from waiting or preempted)
       └──── preempted ◀──┘

A request refused by `Engine.add_request` (bad input: ValueError; full queue: QueueFull) is *rejected*:
it never gets a `Request`, changes nothing, and is only counted in the engine's statistics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hybrid_cache.plan import CacheType, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from scheduler_service.samples import SampleGroup


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"  # new, not yet admitted
    RUNNING = "running"  # holds blocks in the cache
    PREEMPTED = "preempted"  # waiting again: its cache was freed; it will be prefilled again
    FINISHED = "finished"  # ended normally: see `finish_reason` (stop or length)
    ABORTED = "aborted"  # ended early: by the caller (`finish_reason` abort) or a failed step (error)


_FINISHED, _ABORTED = RequestStatus.FINISHED, RequestStatus.ABORTED


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # aborted by the caller, a timeout or the server: see `Request.abort_reason`
    ERROR = "error"  # a step it was in failed (a worker died, or an error traced to it): see `Request.error`


@dataclass
class Request:
    """One generation request. Times are engine-clock seconds."""

    request_id: str
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # The cache type it must use: the caller's `cache_type`, or the only one its longest footprint fits.
    cache_override: CacheType | None = None
    ttft_slo_s: float = float("inf")
    tbt_slo_s: float = float("inf")
    # vLLM's `priority`: lower runs first (fcfs orders by it before arrival; apt weighs pending time by it).
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    cache_type: CacheType | None = None  # the type of the blocks it holds while running
    num_computed_tokens: int = 0  # tokens whose K/V (or x) are in the cache
    token_times: list[float] = field(default_factory=list)  # when each output token was produced
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    text: str = ""
    error: str | None = None  # why it ended with FinishReason.ERROR (shown to the client: no internals)
    abort_reason: str | None = None  # why it ended with FinishReason.ABORT: client, timeout or server
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None: EOS or other)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, when asked for
    # Per prompt position, when asked for (`SamplingParams.prompt_logprobs`): None for the first token.
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # `n`/`best_of` > 1: the samples of the caller's request (`scheduler_service/samples.py`), all with
    # its `request_id`, and this one's index among them (0: the one that prefills the prompt).
    group: SampleGroup | None = field(default=None, repr=False)
    sample_index: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_at(self, start: int, count: int) -> list[int]:
        """`all_token_ids[start : start + count]` without building the whole list: the scheduler asks
        for every running request's next token every step, and a copy of its history each time would
        cost as much as the rest of the step."""
        prompt = self.prompt_token_ids
        end, split = start + count, len(prompt)
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        if end <= split:
            return prompt[start:end]
        return prompt[start:] + self.output_token_ids[: end - split]

    # The properties below are read for every running request in every step: each is spelled out
    # (no property calling another) because Python charges for every call.
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens still to compute before it can sample its next token: 1 for a decode; while it is
        prefilling (a prompt, or prompt plus outputs after a preemption), the rest not yet cached."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """Holds a partly prefilled prompt: the next step computes a chunk of it, not one token."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        """Ended, normally or by abort: it holds no blocks and gets no more tokens."""
        status = self.status
        return status is _FINISHED or status is _ABORTED

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def last_token_time(self) -> float | None:
        return self.token_times[-1] if self.token_times else None

    def pending_since(self) -> float:
        """When it last made progress: its last token, or its arrival (the apt policy's `t_i`)."""
        times = self.token_times
        return times[-1] if times else self.arrival_time

    def violates_slo(self, now: float) -> bool:
        """Already late: no first token within the TTFT SLO, or the current gap over the TBT SLO."""
        if self.last_token_time is None:
            return now - self.arrival_time > self.ttft_slo_s
        return now - self.last_token_time > self.tbt_slo_s


@dataclass(slots=True)
class RequestOutput:
    """What the caller sees after a step: the tokens so far, and whether the request ended.

    Read-only by convention, not `frozen`: a frozen dataclass's `__init__` sets each field through
    `object.__setattr__`, about 4 µs for these fields, and the engine makes one per generated token
    (a quarter of a simulated step's cost, `bench/simulator/speed.py`); a plain one with slots (no
    per-object dict to build and free) takes about 1.5 µs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    cache_type: str | None
    num_preemptions: int
    error: str | None = None
    # Per token of `new_token_ids`, its logprobs when the request asked (`SamplingParams.logprobs`).
    new_logprobs: list[TokenLogprobs] | None = None
    logprobs: list[TokenLogprobs] | None = None  # every output token's: on the finished output only
    # Every prompt token's (None for the first), when asked: on the first output with a token and the last.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    index: int = 0  # the sample it reports (`n`/`best_of` > 1); `finished` is the whole request's
    # The offline `LLM`'s result for `n` > 1: each returned sample's final output, in choice order.
    samples: tuple[RequestOutput, ...] = ()
