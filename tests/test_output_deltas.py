"""Outputs sent as deltas across the engine service's boundary rebuild exactly what the engine made."""

from __future__ import annotations

import pickle

import pytest

from hybrid_cache.plan import TokenLogprobs
from scheduler_service.output_deltas import DeltaEncoder, OutputAssembler
from scheduler_service.request import RequestOutput

PROMPT = [5, 6, 7]


def output(tokens: list[int], new: list[int], text: str, index: int = 0, finished: bool = False,
           **extra: object) -> RequestOutput:
    return RequestOutput("r", PROMPT, tokens, new, text, finished, "stop" if finished else None, "kv", 0,
                         index=index, **extra)  # type: ignore[arg-type]


def roundtrip(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Encode on one side, pickle (as Ray does), rebuild on the other."""
    encoder, assembler = DeltaEncoder(), OutputAssembler(list(PROMPT))
    return [assembler.assemble(pickle.loads(pickle.dumps(encoder.encode(o)))) for o in outputs]


def fields(out: RequestOutput) -> tuple:
    return tuple(getattr(out, name) for name in RequestOutput.__dataclass_fields__)


def test_a_stream_is_rebuilt_field_for_field_even_when_a_stop_string_cuts_the_text_back() -> None:
    lp = TokenLogprobs(9, -0.5, 1, [(9, -0.5)])
    outputs = [
        output([1], [1], "Hel", new_logprobs=[lp], prompt_logprobs=[None, lp, lp]),
        output([1, 2], [2], "Hello wo"),
        output([1, 2, 3], [3], "Hello wo", stop_reason=None),   # no new text (a half character held back)
        output([1, 2, 3, 4], [4], "Hello", finished=True, stop_reason=" wo", logprobs=[lp] * 4),  # cut back
    ]
    assert [fields(o) for o in roundtrip(outputs)] == [fields(o) for o in outputs]


def test_each_sample_of_a_request_keeps_its_own_tokens_and_text() -> None:
    outputs = [output([1], [1], "a", index=0), output([8], [8], "z", index=1),
               output([1, 2], [2], "ab", index=0), output([8, 9], [9], "zy", index=1, finished=True)]
    rebuilt = roundtrip(outputs)
    assert [fields(o) for o in rebuilt] == [fields(o) for o in outputs]
    assert rebuilt[-1].token_ids == [8, 9] and rebuilt[-2].text == "ab"


def test_a_delta_carries_no_history() -> None:
    encoder = DeltaEncoder()
    long_text = "x" * 10_000
    encoder.encode(output(list(range(5000)), [4999], long_text))
    delta = encoder.encode(output(list(range(5001)), [5000], long_text + "y"))
    assert delta.new_token_ids == [5000] and (delta.text_start, delta.text_tail) == (10_000, "y")
    assert len(pickle.dumps(delta)) < 500


def test_a_lost_delta_is_an_error_not_a_silent_gap() -> None:
    encoder, assembler = DeltaEncoder(), OutputAssembler(list(PROMPT))
    encoder.encode(output([1], [1], "a"))  # never delivered
    with pytest.raises(RuntimeError, match="lost tokens"):
        assembler.assemble(encoder.encode(output([1, 2], [2], "ab")))
