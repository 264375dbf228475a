"""Penalties, logit bias, min_p and min_tokens: the engine's greedy tokens equal transformers' with its
own logits processors on the same weights (fp32), prompts chunked or not; the sampler's batched
adjustment equals a row-by-row reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from hybrid_cache.plan import SamplingParams
from worker.logits_adjust import adjust_logits

PROMPT = [5, 17, 9, 33, 5, 17, 40, 41, 42, 9, 9, 60, 61, 5, 70, 71, 72, 73]
EOS = 2
MAX_NEW = 24


def hf_processed_greedy(model: torch.nn.Module, prompt: list[int], max_new: int, processors: LogitsProcessorList,
                        eos: int | None = None) -> list[int]:
    """transformers' model and processors, argmax each step (whole sequence recomputed: no cache)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            scores = processors(ids, model(ids).logits[:, -1].float())
            token = int(scores[0].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
    return out


@pytest.fixture(scope="module")
def hf_llama() -> torch.nn.Module:
    return make_hf_model("llama")


CASES: dict[str, tuple[dict, Callable[[], LogitsProcessorList]]] = {
    "repetition 1.8": (dict(repetition_penalty=1.8), lambda: LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.8)])),
    "repetition 0.6": (dict(repetition_penalty=0.6), lambda: LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(0.6)])),
    "logit_bias": (dict(logit_bias={7: 8.0, 100: -50.0, 33: 5.5}), lambda: LogitsProcessorList(
        [SequenceBiasLogitsProcessor({(7,): 8.0, (100,): -50.0, (33,): 5.5})])),
    "min_p": (dict(min_p=0.3), lambda: LogitsProcessorList(
        [TemperatureLogitsWarper(1.0), MinPLogitsWarper(0.3)])),
}


@pytest.mark.parametrize("chunk", [None, 8], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_with_processors_equals_transformers(make_llm, tiny_models: dict[str, Path], hf_llama, case: str,
                                                     chunk: int | None) -> None:
    fields, processors = CASES[case]
    ref = hf_processed_greedy(hf_llama, PROMPT, MAX_NEW, processors())
    plain = hf_processed_greedy(hf_llama, PROMPT, MAX_NEW, LogitsProcessorList())
    if case != "min_p":
        assert ref != plain, "the processor must change this run, or the test proves nothing"
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64, max_num_batched_tokens=chunk)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **fields))[0]
    assert out.token_ids == ref


def test_min_tokens_holds_eos_back_like_transformers(make_llm, tiny_models: dict[str, Path], hf_llama) -> None:
    """A bias makes EOS the greedy choice at once; min_tokens=5 keeps it out for five tokens."""
    bias = SequenceBiasLogitsProcessor({(EOS,): 30.0})
    ref = hf_processed_greedy(hf_llama, PROMPT, MAX_NEW, LogitsProcessorList(
        [bias, MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, EOS)]), eos=EOS)
    assert len(ref) == 6 and ref[-1] == EOS and EOS not in ref[:-1]
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_NEW, logit_bias={EOS: 30.0},
                                                min_tokens=5))[0]
    assert out.token_ids == ref and out.finish_reason == "stop"
    early = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_NEW, logit_bias={EOS: 30.0}))[0]
    assert early.token_ids == [EOS]


def test_min_tokens_also_holds_stop_token_ids_back(make_llm, tiny_models: dict[str, Path]) -> None:
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64)
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    stop = free[1]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop], min_tokens=4, logit_bias={stop: 40.0}))[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == stop and stop not in out.token_ids[:-1]
    assert out.stop_reason == stop and out.finish_reason == "stop"


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """The bias, then transformers' repetition penalty, then OpenAI's presence/frequency penalties on
    the output (vLLM's order; transformers' too for the first two)."""
    for token, bias in p.logit_bias:
        logits[token] += bias
    scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), logits[None])[0]
    for token in set(output):
        scores[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return scores


def test_presence_and_frequency_penalties_greedy(make_llm, tiny_models: dict[str, Path], hf_llama) -> None:
    """transformers has no presence/frequency processor: the reference applies OpenAI's formula to its logits."""
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.7, repetition_penalty=1.2)
    ids, output = torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            scores = reference_penalties(hf_llama(ids).logits[0, -1].float(), PROMPT, output, params)
            output.append(int(scores.argmax()))
            ids = torch.cat([ids, torch.tensor([[output[-1]]])], dim=1)
    plain = hf_processed_greedy(hf_llama, PROMPT, MAX_NEW, LogitsProcessorList())
    assert output != plain
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64, max_num_batched_tokens=8)
    assert llm.generate([PROMPT], params)[0].token_ids == output


def test_batched_adjustment_equals_row_by_row() -> None:
    """A mixed batch adjusted at once equals each row adjusted alone by the reference."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen) * 3
    histories = [[1, 2, 3, 3, 7, 7, 7], [4, 4, 5], [9, 1], [0, 0, 0, 1]]
    prompt_lens = [3, 1, 2, 2]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, logit_bias={5: -3.0, 49: 2.0}),
        SamplingParams(frequency_penalty=-1.0, min_tokens=3, stop_token_ids=[4]),
        SamplingParams(),
    ]
    got = adjust_logits(logits, histories, prompt_lens, params, eos_token_ids=[0])
    for i, p in enumerate(params):
        want = reference_penalties(logits[i].clone(), histories[i][: prompt_lens[i]], histories[i][prompt_lens[i]:], p)
        if i == 2:  # no output yet, min_tokens 3: EOS (0) and the stop token (4) are out
            want[[0, 4]] = float("-inf")
        assert torch.allclose(got[i], want), i
