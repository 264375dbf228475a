"""`n > 1` and `best_of`: parallel samples of one prompt that share its prefill and its prompt blocks.

Each sample is a sequence the scheduler sees; the prompt is prefilled once (the engine's
`num_prefills` counter), the others fork from it with shared blocks and a copied last block. Each
sample's tokens equal a single request's with the sample's seed (`seed + index`), greedy ones equal
transformers', and nothing leaks whichever way the samples end.
"""

from __future__ import annotations

import random

import pytest
from conftest import assert_cache_empty, assert_matches_reference, hf_greedy, make_hf_model

from hybrid_cache.plan import SamplingParams
from scheduler_service.request import RequestOutput
from scheduler_service.samples import best_samples, cumulative_logprob

VOCAB = 256
PROMPT = [random.Random(3).randrange(3, VOCAB) for _ in range(10)]  # 10 tokens: 2 full blocks of 4, 1 partial


def run(engine, prompt: list[int], params: SamplingParams, request_id: str = "r") -> dict[int, RequestOutput]:  # noqa: ANN001
    """Step until the request ends; its final output per sample index. Exactly one output, the last
    one of the request, says `finished`."""
    engine.add_request(prompt, params, request_id=request_id)
    finals: dict[int, RequestOutput] = {}
    seen_finished = False
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            assert not seen_finished, "an output came after the request's finished one"
            seen_finished = out.finished
            if out.finish_reason is not None:
                finals[out.index] = out
    assert seen_finished
    return finals


def single(engine, prompt: list[int], params: SamplingParams) -> RequestOutput:  # noqa: ANN001
    [out] = run(engine, prompt, params, request_id="single").values()
    return out


@pytest.mark.parametrize("mode", ["kv", "hidden"])
def test_n3_seeded_prefills_once_and_each_sample_is_its_seeds_single_run(tiny_models, make_llm, mode: str) -> None:
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode=mode)
    engine = llm.engine
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, n=3)
    before = engine.stats()
    finals = run(engine, PROMPT, params)
    after = engine.stats()
    assert sorted(finals) == [0, 1, 2]
    assert after.num_prefills - before.num_prefills == 1, "the prompt was prefilled once"
    assert after.num_forked_samples - before.num_forked_samples == 2
    assert_cache_empty(engine)
    texts = {tuple(out.token_ids) for out in finals.values()}
    assert len(texts) == 3, "seeded samples differ"
    for index, out in finals.items():
        alone = single(engine, PROMPT, SamplingParams(temperature=1.0, seed=11 + index, max_tokens=8, ignore_eos=True))
        assert out.token_ids == alone.token_ids, f"sample {index} differs from a single run with seed {11 + index}"
        assert out.finish_reason == "length" and out.prompt_token_ids == PROMPT
    assert_cache_empty(engine)


@pytest.mark.parametrize(("mode", "prompt_len"), [("kv", 10), ("kv", 8), ("kv", 1), ("hidden", 10), ("hidden", 16)])
def test_greedy_samples_equal_transformers(tiny_models, make_llm, mode: str, prompt_len: int) -> None:
    """Prompt lengths: a partial last block, a full last block (8 = 2 blocks of 4: it is copied, not
    shared), one token; hidden blocks hold 8 tokens."""
    prompt = (PROMPT * 2)[:prompt_len]
    reference = hf_greedy(make_hf_model("opt"), prompt, 12)
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode=mode)
    finals = run(llm.engine, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=3))
    assert sorted(finals) == [0, 1, 2]
    for index, out in finals.items():
        assert_matches_reference(out.token_ids, reference, f"{mode} sample {index}")
    assert llm.engine.stats().num_prefills == 1  # samples 1 and 2 fork (even from a 1-token prompt)


def test_forked_samples_share_blocks_while_they_run(tiny_models, make_llm) -> None:
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3), request_id="r")
    engine.step()  # the prefill, then the fork
    samples = engine.requests["r"].group.members
    assert len(samples) == 3 and [s.sample_index for s in samples] == [0, 1, 2]
    tables = [engine.cache.table(s.seq_id) for s in samples]
    shared = tables[0].block_ids[:2]  # tokens 0..7; token 9 is in the third block, copied per sample
    assert all(t.block_ids[:2] == shared for t in tables)
    assert len({t.block_ids[2] for t in tables}) == 3
    assert all(engine.cache.pool.refcount(b) == 3 for b in shared)
    assert engine.cache.usage().shared_blocks == 3  # 2 shared prompt blocks + the copy source held
    assert tables[1].blocks == [tables[1].block_ids[2]], "a sample alone holds its copy only"
    engine.cache.check_invariants()
    engine.step()  # the samples' first step: their copies run, the sources are let go
    engine.cache.check_invariants()
    assert engine.cache.usage().shared_blocks == 2
    while engine.has_unfinished():
        engine.step()
    assert_cache_empty(engine)


def test_abort_ends_every_sample_and_frees_every_block(tiny_models, make_llm) -> None:
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True, n=4), request_id="r")
    for _ in range(3):
        engine.step()
    assert engine.abort("r") and not engine.abort("r")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "r"]
    assert sorted(o.index for o in aborted) == [0, 1, 2, 3]
    assert all(o.finish_reason == "abort" for o in aborted)
    assert [o.finished for o in aborted] == [False, False, False, True]
    assert "r" not in engine.requests and not engine.has_unfinished()
    assert_cache_empty(engine)


def test_samples_that_end_early_free_their_blocks_and_the_id_lives_until_the_last(tiny_models, make_llm) -> None:
    """Sample 0 ends at once (max_tokens counts per sample, so use a stop token that only some hit)."""
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    engine = llm.engine
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True, n=6)
    free_run = run(engine, PROMPT, params)
    # Stop each sample at its own third token: samples whose third token appears earlier stop earlier.
    stops = tuple(sorted({out.token_ids[2] for out in free_run.values()}))
    finals = run(engine, PROMPT, SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True, n=6,
                                                stop_token_ids=stops))
    assert {len(out.token_ids) for out in finals.values()} != {20}
    assert all(out.finish_reason == "stop" for out in finals.values())
    assert_cache_empty(engine)


def test_preempted_samples_recompute_from_their_own_tokens(tiny_models, make_llm) -> None:
    reference = hf_greedy(make_hf_model("opt"), PROMPT, 24)
    # 14 blocks of 4 tokens: one sample at its longest (34 tokens) needs 9; four cannot all grow.
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=14, cache_mode="kv")
    finals = run(llm.engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, n=4))
    assert llm.stats().num_preemptions > 0, "the budget was meant to force preemption"
    for index, out in finals.items():
        assert_matches_reference(out.token_ids, reference, f"sample {index}")
    assert_cache_empty(llm.engine)


def test_best_of_returns_the_likeliest_samples(tiny_models, make_llm) -> None:
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    finals = run(llm.engine, PROMPT, SamplingParams(temperature=1.0, seed=2, max_tokens=6, ignore_eos=True,
                                                     n=2, best_of=5))
    assert sorted(finals) == [0, 1, 2, 3, 4]
    assert all(len(out.logprobs) == 6 for out in finals.values()), "best_of computes every sample's logprobs"
    best = best_samples(list(finals.values()), 2)
    scores = sorted((cumulative_logprob(out) for out in finals.values()), reverse=True)
    assert [cumulative_logprob(out) for out in best] == scores[:2]
    assert [out.index for out in best] == [0, 1]
    assert_cache_empty(llm.engine)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("n", 0, "n must be"), ("n", 65, "n must be"), ("n", 2.0, "n must be an integer"),
    ("best_of", 1, "best_of must be"), ("best_of", 99, "best_of must be"),
])
def test_bad_sample_counts_are_refused(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SamplingParams(n=2, **{field: value}) if field == "best_of" else SamplingParams(**{field: value})


def test_many_samples_under_a_small_cache_keep_the_invariants(tiny_models, make_llm) -> None:
    """More samples than fit at once, some of them prompts with a copy pending when memory runs out."""
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=24, cache_mode="kv", max_num_seqs=5)
    engine = llm.engine
    for i in range(3):
        engine.add_request(PROMPT[: 5 + i], SamplingParams(temperature=1.0, seed=i, max_tokens=12, n=5,
                                                           ignore_eos=True), request_id=f"r{i}")
    ended: dict[str, set[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason is not None:
                ended.setdefault(out.request_id, set()).add(out.index)
        engine.cache.check_invariants()
    assert ended == {f"r{i}": set(range(5)) for i in range(3)}
    assert_cache_empty(engine)


def test_forked_samples_penalise_the_prompt_even_when_sample_0_ended_first(tiny_models, make_llm) -> None:
    """A repetition penalty counts the prompt: a forked sample takes sample 0's history on its first
    step, so sample 0 ending before it (max_tokens=1) must not lose that history."""
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    engine = llm.engine
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    rng = random.Random(0)
    for _ in range(200):  # a prompt whose unpenalised next token is one of its own tokens
        prompt = [rng.randrange(3, VOCAB) for _ in range(30)]
        unpenalised = single(engine, prompt, plain).token_ids[0]
        if unpenalised in prompt:
            break
    else:
        pytest.fail("no prompt found whose next token repeats it")
    penalised = SamplingParams(temperature=0.0, max_tokens=1, repetition_penalty=50.0)
    expected = single(engine, prompt, penalised).token_ids
    assert expected != [unpenalised], "the penalty must matter for this check"
    finals = run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=1, repetition_penalty=50.0, n=3))
    assert {index: out.token_ids for index, out in finals.items()} == {0: expected, 1: expected, 2: expected}
    assert_cache_empty(engine)


def test_offline_llm_returns_every_sample(tiny_models, make_llm) -> None:
    """`LLM.generate` gives one result per prompt; with n > 1 it carries each sample, in index order,
    the same samples the engine's stream reports (best_of > n: the n likeliest)."""
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="kv")
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=3)
    [result] = llm.generate([PROMPT], params)
    assert result.finished and [s.index for s in result.samples] == [0, 1, 2]
    streamed = run(llm.engine, PROMPT, params, request_id="again")
    assert [s.token_ids for s in result.samples] == [streamed[j].token_ids for j in range(3)]
    [plain] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))
    assert plain.samples == (), "a single sample needs no list"
    best = SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=2, best_of=4)
    [ranked] = llm.generate([PROMPT], best)
    all_four = run(llm.engine, PROMPT, best, request_id="ranked")
    assert [s.token_ids for s in ranked.samples] == [s.token_ids for s in best_samples(list(all_four.values()), 2)]
