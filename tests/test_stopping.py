"""Stop conditions: EOS (unless ignore_eos), stop token ids, stop strings, max_tokens, the context."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.executor_local import LocalExecutor
from hybrid_cache.plan import SamplingParams
from scheduler_service import Engine, SchedulerConfig


class LetterDetokenizer:
    """Token i reads as one letter, so stop strings are easy to place."""

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in token_ids)


@pytest.fixture
def engine(tiny_models: dict[str, Path]) -> Engine:
    config = load_config(overrides={"model.path": str(tiny_models["opt"]), "model.dtype": "float32",
                                    "cache.block_size": 4, "cache.num_blocks": 128})
    return Engine(SchedulerConfig(), LocalExecutor(config.model, config.cache), detokenizer=LetterDetokenizer())


def run(engine: Engine, prompt: list[int], params: SamplingParams):
    request_id = engine.add_request(prompt, params)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                final = out
    assert engine.cache.usage().num_free == engine.cache.num_blocks
    return final


PROMPT = [5, 17, 9, 33]


def test_max_tokens(engine: Engine) -> None:
    out = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_and_eos(engine: Engine) -> None:
    free = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    third = free.token_ids[2]
    stopped = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[third]))
    first = free.token_ids.index(third)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    # The same token as the model's EOS ends generation unless ignore_eos is set.
    engine.info = engine.info.__class__(**{**engine.info.__dict__, "eos_token_ids": (third,)})
    eos = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12))
    assert eos.token_ids == free.token_ids[: first + 1] and eos.finish_reason == "stop"
    ignored = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert ignored.token_ids == free.token_ids


def test_stop_string_truncates_text(engine: Engine) -> None:
    free = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop = free.text[4:6]
    out = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop, "zzzzzz"]))
    cut = free.text.find(stop)
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut] and stop not in out.text
    assert out.token_ids == free.token_ids[: cut + len(stop)]


def test_context_limit_ends_with_length(engine: Engine) -> None:
    limit = engine.info.max_model_len
    prompt = [7] * (limit - 3)
    out = run(engine, prompt, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_stop_token_text_and_stop_string_kept_only_when_asked(engine: Engine) -> None:
    free = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    third = free.token_ids[2]
    first = free.token_ids.index(third)
    dropped = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[third]))
    assert dropped.text == free.text[:first] and dropped.stop_reason == third
    kept = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[third],
                                              include_stop_str_in_output=True))
    assert kept.text == free.text[: first + 1]
    stop = free.text[4:6]
    cut = free.text.find(stop)
    with_stop = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))
    assert with_stop.text == free.text[: cut + len(stop)] and with_stop.stop_reason == stop


def test_min_tokens_ignores_an_early_stop_string(engine: Engine) -> None:
    free = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop = free.text[1]  # one letter: found in the second token's text
    early = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    assert len(early.token_ids) == free.text.find(stop) + 1
    late = run(engine, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=6))
    later_hit = free.text.find(stop, 5)
    assert len(late.token_ids) == (later_hit + 1 if later_hit >= 0 else 12)
