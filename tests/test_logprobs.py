"""Logprobs: each generated token's log probability, rank and top alternatives equal transformers'
log-softmax of the same run (fp32, within 1e-3), greedy or sampled, chunked prompts and batches too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_hf_model

from hybrid_cache.plan import SamplingParams, TokenLogprobs

PROMPTS = [[5, 17, 9, 33, 5, 17, 40, 41, 42, 9, 9, 60, 61], [100, 7, 3]]
TOLERANCE = 1e-3


def hf_logprobs(model: torch.nn.Module, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each generated position `[len(output), vocab]`, teacher-forced."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) + len(output) - 1]


def check(logprobs: list[TokenLogprobs], output: list[int], ref: torch.Tensor, k: int) -> None:
    assert [lp.token_id for lp in logprobs] == output
    for i, lp in enumerate(logprobs):
        assert abs(lp.logprob - float(ref[i, output[i]])) < TOLERANCE, i
        assert lp.rank == int((ref[i] > ref[i, output[i]]).sum()) + 1
        assert len(lp.top) == k
        want = ref[i].topk(k)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert all(abs(a - b) < TOLERANCE for (_, a), b in zip(lp.top, want.values.tolist()))


@pytest.fixture(scope="module")
def hf_llama() -> torch.nn.Module:
    return make_hf_model("llama")


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole", "chunked"])
def test_greedy_logprobs_equal_transformers(make_llm, tiny_models: dict[str, Path], hf_llama, chunk) -> None:
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64, max_num_batched_tokens=chunk)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)]
    outs = llm.generate(PROMPTS, params)
    for out, prompt, p in zip(outs, PROMPTS, params):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 10
        check(out.logprobs, out.token_ids, hf_logprobs(hf_llama, prompt, out.token_ids), p.logprobs)
        assert all(lp.rank == 1 for lp in out.logprobs), "greedy picks the likeliest token"


def test_sampled_logprobs_are_the_raw_models(make_llm, tiny_models: dict[str, Path], hf_llama) -> None:
    """With temperature, top-k and a penalty the reported logprobs are still the raw model's (vLLM's default)."""
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64)
    params = SamplingParams(temperature=1.5, top_k=20, seed=7, max_tokens=12, ignore_eos=True, logprobs=3,
                            repetition_penalty=1.3)
    out = llm.generate([PROMPTS[0]], params)[0]
    check(out.logprobs, out.token_ids, hf_logprobs(hf_llama, PROMPTS[0], out.token_ids), 3)
    assert any(lp.rank > 1 for lp in out.logprobs), "a sampled run at temperature 1.5 leaves the argmax"


def test_no_logprobs_unless_asked(make_llm, tiny_models: dict[str, Path]) -> None:
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64)
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.logprobs is None


def test_logprobs_stream_with_each_token(tiny_models: dict[str, Path]) -> None:
    """Each step's output carries the logprobs of its new token; the finished one carries them all."""
    from cluster.config import load_config
    from cluster.executor_local import LocalExecutor
    from scheduler_service import Engine, SchedulerConfig

    config = load_config(overrides={"model.path": str(tiny_models["llama"]), "model.dtype": "float32",
                                    "cache.block_size": 4, "cache.num_blocks": 64})
    engine = Engine(SchedulerConfig(), LocalExecutor(config.model, config.cache))
    request_id = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                               logprobs=2))
    streamed, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == request_id
            assert [lp.token_id for lp in out.new_logprobs] == out.new_token_ids
            streamed += out.new_logprobs
            final = out
    assert final.finished and final.logprobs == streamed and len(streamed) == 4


@pytest.mark.parametrize("chunk", [None, 4, 5], ids=["whole", "chunks-of-4", "chunks-of-5"])
def test_prompt_logprobs_equal_transformers(make_llm, tiny_models: dict[str, Path], hf_llama, chunk) -> None:
    """Every prompt token after the first, scored given the tokens before it, across chunk boundaries too."""
    llm = make_llm(tiny_models["llama"], block_size=4, num_blocks=64, max_num_batched_tokens=chunk)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3))
    for out, prompt in zip(outs, PROMPTS):
        with torch.no_grad():
            ref = hf_llama(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        check(got[1:], prompt[1:], ref[:-1], 3)


def test_sampled_tokens_cross_the_codec_with_their_logprobs() -> None:
    from hybrid_cache.plan import SampledTokens
    from hybrid_cache.plan_codec import decode_sampled, encode_sampled

    sampled = SampledTokens([3, 4, 5], [None, TokenLogprobs(4, -1.25, 2, ((7, -0.5), (4, -1.25))),
                                        TokenLogprobs(5, -0.1, 1)],
                            [[None, TokenLogprobs(9, -2.0, 3, ((1, -0.1),))], None, []])
    again = decode_sampled(encode_sampled(sampled))
    assert again == [3, 4, 5] and again.logprobs == sampled.logprobs
    assert again.prompt_logprobs == sampled.prompt_logprobs
    plain = decode_sampled(encode_sampled([1, 2]))
    assert plain == [1, 2] and plain.logprobs is None and plain.prompt_logprobs is None
