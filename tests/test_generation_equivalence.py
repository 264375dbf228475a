"""Greedy output of our engine equals transformers token for token (float32), in every cache mode,
batch mix, memory pressure (preemption) and with hidden→KV conversion mid-generation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import VOCAB, assert_matches_reference, hf_greedy, make_hf_model

from cluster import SamplingParams

NUM_PROMPTS = 10
PROMPT_LENGTHS = [3, 9, 17, 5, 30, 12, 1, 24, 7, 40]
MAX_NEW = [24, 12, 30, 18, 8, 26, 20, 14, 28, 16]


@pytest.fixture(params=["torch", "cpu_paged"], scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs once per attention backend."""
    return request.param


@pytest.fixture
def make_llm(make_llm, backend: str):  # type: ignore[no-untyped-def]
    """conftest's factory, with `cache.attention_backend` set to this run's backend."""
    from cluster.config import load_config, with_overrides

    def factory(model, **kwargs):  # type: ignore[no-untyped-def]
        overrides = {"cache.attention_backend": backend, "scheduler.max_waiting": None}
        llm = make_llm(model, config=with_overrides(load_config(), overrides), **kwargs)
        assert llm.engine.executor.runner.backend.name == backend
        return llm

    return factory


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


_REFERENCES: dict[str, list] = {}


def references(name: str) -> list:
    """HF greedy continuations for each prompt, computed once per model."""
    if name not in _REFERENCES:
        model = make_hf_model(name)
        _REFERENCES[name] = [hf_greedy(model, p, n) for p, n in zip(prompts(), MAX_NEW)]
    return _REFERENCES[name]


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_NEW]


def run_and_compare(llm, name: str, cache_types: list[str | None]) -> None:
    inputs = [
        {"prompt_token_ids": p, "cache_type": c} if c else {"prompt_token_ids": p}
        for p, c in zip(prompts(), cache_types)
    ]
    outputs = llm.generate(inputs, params())
    for i, (out, ref) in enumerate(zip(outputs, references(name))):
        assert out.finish_reason == "length"
        assert_matches_reference(out.token_ids, ref, f"{name} prompt {i}")


MHA = ["opt", "llama"]


@pytest.mark.parametrize("name", MHA + ["llama-gqa"])
def test_kv_mode(tiny_models: dict[str, Path], make_llm, name: str) -> None:
    llm = make_llm(tiny_models[name], block_size=4, num_blocks=400, cache_mode="kv")
    run_and_compare(llm, name, [None] * NUM_PROMPTS)
    assert llm.stats().num_preemptions == 0


@pytest.mark.parametrize("name", MHA)
def test_hidden_mode(tiny_models: dict[str, Path], make_llm, name: str) -> None:
    # A small recompute chunk makes long histories span several chunks (online-softmax merge).
    llm = make_llm(tiny_models[name], block_size=4, num_blocks=400, cache_mode="hidden", recompute_chunk_tokens=16)
    run_and_compare(llm, name, [None] * NUM_PROMPTS)
    stats = llm.stats()
    # The engine's own report: hidden bytes are r = 0.5 times KV bytes; a block holds 1/r as many tokens.
    assert stats.ratio == 0.5
    assert stats.hidden_bytes_per_token_per_layer * 2 == stats.kv_bytes_per_token_per_layer
    assert stats.hidden_tokens_per_block == 2 * stats.block_size


@pytest.mark.parametrize("name", MHA)
def test_mixed_batch_by_override(tiny_models: dict[str, Path], make_llm, name: str) -> None:
    llm = make_llm(tiny_models[name], block_size=4, num_blocks=400, cache_mode="kv", recompute_chunk_tokens=16)
    run_and_compare(llm, name, ["hidden", "kv"] * (NUM_PROMPTS // 2))


PREEMPTION_CASES = [(name, mode) for name in MHA for mode in ("kv", "hidden", "mixed")] + [("llama-gqa", "kv")]


@pytest.mark.parametrize(("name", "mode"), PREEMPTION_CASES)
def test_preemption_under_small_budget(tiny_models: dict[str, Path], make_llm, name: str, mode: str) -> None:
    overrides = ["hidden", "kv"] * (NUM_PROMPTS // 2) if mode == "mixed" else [None] * NUM_PROMPTS
    cache_mode = "hidden" if mode == "hidden" else "kv"
    # 20 blocks of 4 tokens: the longest request (40 + 16 tokens) fits alone, the batch does not.
    llm = make_llm(
        tiny_models[name], block_size=4, num_blocks=20, cache_mode=cache_mode, recompute_chunk_tokens=16
    )
    run_and_compare(llm, name, overrides)
    assert llm.stats().num_preemptions > 0, "the budget was meant to force preemption"


@pytest.mark.parametrize("name", MHA)
def test_hybrid_mode_converts_hidden_to_kv_mid_generation(tiny_models: dict[str, Path], make_llm, name: str) -> None:
    # A long, short-lived request fills the cache, so the next one is admitted as hidden; once the
    # long one ends and nothing waits, the hidden one is converted to KV in place and goes on.
    rng = random.Random(11)
    lengths, max_new = [84, 13, 10, 7], [3, 30, 20, 25]
    batch = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    model = make_hf_model(name)
    refs = [hf_greedy(model, p, n) for p, n in zip(batch, max_new)]
    llm = make_llm(tiny_models[name], block_size=4, num_blocks=24, cache_mode="hybrid", recompute_chunk_tokens=16)
    llm.engine.config.conversion_free_fraction = 0.0
    engine = llm.engine
    ids = [
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for p, n in zip(batch, max_new)
    ]
    seen_types: dict[str, set[str]] = {i: set() for i in ids}
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.cache_type:
                seen_types[out.request_id].add(out.cache_type)
            if out.finished:
                finished[out.request_id] = out
    assert engine.stats().num_conversions > 0
    assert seen_types[ids[1]] == {"hidden", "kv"}, f"request 1 ran as {seen_types[ids[1]]}"
    for i, (request_id, ref) in enumerate(zip(ids, refs)):
        assert_matches_reference(finished[request_id].token_ids, ref, f"{name} conversion prompt {i}")


@pytest.mark.parametrize("cache_mode", ["kv", "hybrid"])
@pytest.mark.parametrize("name", MHA)
def test_apt_policy_under_small_budget(tiny_models: dict[str, Path], make_llm, name: str, cache_mode: str) -> None:
    # apt picks the batch and cache types by pending time; whatever it picks, tokens stay exact.
    llm = make_llm(
        tiny_models[name], block_size=4, num_blocks=20, cache_mode=cache_mode, policy="apt", recompute_chunk_tokens=16
    )
    run_and_compare(llm, name, [None] * NUM_PROMPTS)
    stats = llm.stats()
    assert stats.num_preemptions > 0, "the budget was meant to force preemption"
    split = stats.step_seconds
    assert split["model"] >= split["attention"] > 0 and split["scheduling"] > 0
    assert (split.get("recompute", 0.0) > 0) == (cache_mode == "hybrid")
    if cache_mode == "hybrid":
        assert stats.tokens_by_cache_type["hidden"] > 0, "apt should use the hidden cache under memory pressure"
    else:
        assert stats.tokens_by_cache_type["hidden"] == 0


@pytest.mark.parametrize("block_size", [1, 3, 32])
def test_any_block_size(tiny_models: dict[str, Path], make_llm, block_size: int) -> None:
    llm = make_llm(tiny_models["opt"], block_size=block_size, num_blocks=4000 // block_size, cache_mode="kv")
    run_and_compare(llm, "opt", ["hidden", "kv"] * (NUM_PROMPTS // 2))
