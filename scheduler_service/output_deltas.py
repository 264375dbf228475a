"""Outputs as deltas across a process boundary: what the engine service sends, and how a caller
rebuilds the `RequestOutput` it would have read in-process.

A `RequestOutput` carries the request's whole history (prompt ids, every output token, the whole
text), so sending one per token is quadratic in the output's length. `OutputDelta` carries what the
step added: the new token ids, and the text as a cut point plus the new tail (the text is not
append-only: a stop string found at the end cuts back what came before it). Per stream, a
`DeltaEncoder` on the engine's side and an `OutputAssembler` on the caller's side keep the running
state, one per sample (`index`) of the request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hybrid_cache.plan import TokenLogprobs
from scheduler_service.request import RequestOutput


@dataclass(slots=True)
class OutputDelta:
    """One step of one sample of a request: `RequestOutput` without the history."""

    request_id: str
    index: int
    new_token_ids: list[int]
    num_tokens: int  # output tokens so far, these included: the caller checks it rebuilt them all
    text_start: int  # the text keeps its first `text_start` characters, then `text_tail` follows
    text_tail: str
    finished: bool
    finish_reason: str | None
    cache_type: str | None
    num_preemptions: int
    error: str | None
    new_logprobs: list[TokenLogprobs] | None
    logprobs: list[TokenLogprobs] | None  # sparse already in RequestOutput: on the finished output only
    prompt_logprobs: list[TokenLogprobs | None] | None
    stop_reason: str | int | None


@dataclass
class DeltaEncoder:
    """The engine's side of one request's stream: each output's change since the last one sent."""

    _texts: dict[int, str] = field(default_factory=dict)  # per sample: the text the caller has

    def encode(self, output: RequestOutput) -> OutputDelta:
        sent = self._texts.get(output.index, "")
        start = len(os.path.commonprefix([sent, output.text]))
        self._texts[output.index] = output.text
        return OutputDelta(
            output.request_id, output.index, output.new_token_ids, len(output.token_ids), start,
            output.text[start:], output.finished,
            output.finish_reason, output.cache_type, output.num_preemptions, output.error, output.new_logprobs,
            output.logprobs, output.prompt_logprobs, output.stop_reason,
        )


@dataclass
class OutputAssembler:
    """The caller's side of one request's stream: rebuilds each `RequestOutput` from its delta."""

    prompt_token_ids: list[int]
    _tokens: dict[int, list[int]] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)

    def assemble(self, delta: OutputDelta) -> RequestOutput:
        tokens = self._tokens.setdefault(delta.index, [])
        tokens.extend(delta.new_token_ids)
        if len(tokens) != delta.num_tokens:
            raise RuntimeError(f"output of {delta.request_id!r} lost tokens: {len(tokens)} of {delta.num_tokens}")
        text = self._texts[delta.index] = self._texts.get(delta.index, "")[: delta.text_start] + delta.text_tail
        return RequestOutput(
            delta.request_id, self.prompt_token_ids, list(tokens), delta.new_token_ids, text, delta.finished,
            delta.finish_reason, delta.cache_type, delta.num_preemptions, error=delta.error,
            new_logprobs=delta.new_logprobs, logprobs=delta.logprobs, prompt_logprobs=delta.prompt_logprobs,
            stop_reason=delta.stop_reason, index=delta.index,
        )
