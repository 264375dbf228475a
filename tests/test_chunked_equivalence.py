"""Greedy output equals transformers token for token when prompts are prefilled in chunks over several
steps and mixed with decodes: every cache mode under both policies (apt mixed and paper-structured),
under memory pressure (preemption mid-prefill and mid-decode), on both attention backends."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import VOCAB, assert_matches_reference, hf_greedy, make_hf_model

from cluster import SamplingParams

PROMPT_LENGTHS = [3, 9, 17, 5, 30, 12, 1, 24, 7, 40]
MAX_NEW = [24, 12, 30, 18, 8, 26, 20, 14, 28, 16]
# Odd, and below most prompts: chunks end mid-block and most prompts take several steps.
TOKEN_BUDGET = 7

_REFERENCES: dict[str, list] = {}


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


def references(name: str) -> list:
    """HF greedy continuations for each prompt, computed once per model."""
    if name not in _REFERENCES:
        model = make_hf_model(name)
        _REFERENCES[name] = [hf_greedy(model, p, n) for p, n in zip(prompts(), MAX_NEW)]
    return _REFERENCES[name]


class StepWatcher:
    """Wraps the executor: counts sequences that computed part of a prompt and steps that mixed a
    prompt chunk with a decode."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine, self.inner = engine, engine.executor
        self.partial_chunks = self.mixed_steps = 0
        engine.executor = self

    def execute(self, plan):  # noqa: ANN001, ANN201
        by_seq = {r.seq_id: r for r in self.engine.requests.values()}
        kinds = set()
        for seq in plan.seqs:
            request = by_seq[seq.seq_id]
            self.partial_chunks += seq.context_len < request.num_tokens
            kinds.add("prefill" if request.num_computed_tokens == 0 or request.is_prefilling else "decode")
        self.mixed_steps += kinds == {"prefill", "decode"}
        return self.inner.execute(plan)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)


# (model, policy, cache mode, mixed, attention backend): every cache mode under each policy, apt in
# both step structures, each model and backend several times (each case runs ~100 small steps).
CASES = [
    ("opt", "fcfs", "kv", True, "torch"),
    ("llama", "fcfs", "hidden", True, "cpu_paged"),
    ("opt", "fcfs", "hybrid", True, "cpu_paged"),
    ("llama", "apt", "kv", True, "torch"),
    ("opt", "apt", "hidden", True, "torch"),
    ("llama", "apt", "hybrid", True, "cpu_paged"),
    ("opt", "apt", "hybrid", False, "torch"),
]


@pytest.mark.parametrize(("name", "policy", "cache_mode", "mixed", "backend"), CASES)
def test_chunked_prefill_matches_transformers(
    tiny_models: dict[str, Path], make_llm, name: str, policy: str, cache_mode: str, mixed: bool, backend: str
) -> None:
    from cluster.config import load_config, with_overrides

    overrides = {"cache.attention_backend": backend, "scheduler.max_waiting": None, "scheduler.mixed": mixed}
    # 20 blocks of 4 tokens (10 for hidden, 8 tokens a block; 15 for hybrid, so that FCFS turns to the
    # hidden cache): the longest request (40 + 16 tokens) fits alone, the batch does not.
    llm = make_llm(
        tiny_models[name], config=with_overrides(load_config(), overrides), block_size=4,
        num_blocks={"kv": 20, "hidden": 10, "hybrid": 15}[cache_mode],
        cache_mode=cache_mode, policy=policy, max_num_batched_tokens=TOKEN_BUDGET, recompute_chunk_tokens=16,
    )
    watcher = StepWatcher(llm.engine)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_NEW]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    for i, (out, ref) in enumerate(zip(outputs, references(name))):
        assert out.finish_reason == "length"
        assert_matches_reference(out.token_ids, ref, f"{name} {policy}/{cache_mode} prompt {i}")
    stats = llm.stats()
    assert watcher.partial_chunks > 0, "the token budget was meant to split prompts"
    assert stats.num_preemptions > 0, "the budget was meant to force preemption"
    assert (watcher.mixed_steps > 0) == mixed
    # FCFS turns to the hidden cache when KV blocks run out; apt in hybrid may keep to KV here (its
    # hidden value is negative at this α), so its hidden path is covered by the hidden-mode case.
    if cache_mode == "hidden" or (cache_mode == "hybrid" and policy == "fcfs"):
        assert stats.tokens_by_cache_type["hidden"] > 0


def test_a_seeded_request_samples_the_same_tokens_chunked_or_not(tiny_models: dict[str, Path], make_llm) -> None:
    """Partial chunks draw no random numbers: the request's generator sees only its real tokens."""
    prompt = prompts()[9]  # 40 tokens: six chunks of 7
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    whole = make_llm(tiny_models["opt"], block_size=4, num_blocks=100).generate([prompt], params)[0]
    chunked = make_llm(tiny_models["opt"], block_size=4, num_blocks=100, max_num_batched_tokens=TOKEN_BUDGET)
    watcher = StepWatcher(chunked.engine)
    assert chunked.generate([prompt], params)[0].token_ids == whole.token_ids
    assert watcher.partial_chunks == 5
