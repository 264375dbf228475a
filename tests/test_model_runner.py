"""The model runner over plans the engine does not make yet: a prompt continued in several pieces
(chunked prefill), KV and hidden requests side by side, and a conversion in the same step."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_hf_model

from hybrid_cache import CacheConfig, CacheManager, CacheType, SamplingParams
from hybrid_cache.plan import BatchPlan, SequencePlan
from worker.config import ModelConfig
from worker.model_runner import ModelRunner

PIECES = [(0, 7), (7, 19), (19, 20), (20, 33), (33, 34)]  # prefill, continue, decode, continue, decode
GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_pieces_of_kv_and_hidden_requests_match_full_forward(tiny_models: dict[str, Path], name: str) -> None:
    rng = random.Random(5)
    sequences = {seq: [rng.randrange(3, VOCAB) for _ in range(PIECES[-1][1])] for seq in (0, 1)}
    model = make_hf_model(name)
    with torch.no_grad():
        reference = {seq: model(torch.tensor([tokens])).logits[0] for seq, tokens in sequences.items()}
    runner = ModelRunner(
        ModelConfig(path=str(tiny_models[name]), dtype="float32"),
        CacheConfig(block_size=4, num_blocks=64, recompute_chunk_tokens=6),
    )
    cache = CacheManager(runner.layout, runner.cache.num_blocks)
    types = {0: CacheType.KV, 1: CacheType.HIDDEN}
    for begin, end in PIECES:
        seqs = []
        for seq, cache_type in types.items():
            if begin == 0:
                cache.allocate(seq, end, cache_type)
            else:
                cache.grow(seq, end)
            table = cache.table(seq)
            seqs.append(SequencePlan(seq, sequences[seq][begin:end], begin, table.cache_type, table.blocks, GREEDY))
        logits = runner.execute(BatchPlan(seqs), return_logits=True).logits
        for row, seq in enumerate(types):
            torch.testing.assert_close(logits[row], reference[seq][end - 1], atol=1e-4, rtol=1e-4)
    for seq in types:
        cache.free(seq)
    cache.check_invariants()


def test_conversion_in_the_same_step_as_other_requests(tiny_models: dict[str, Path]) -> None:
    rng = random.Random(9)
    tokens = [rng.randrange(3, VOCAB) for _ in range(26)]
    other = [rng.randrange(3, VOCAB) for _ in range(9)]
    model = make_hf_model("opt")
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
        ref_other = model(torch.tensor([other])).logits[0]
    runner = ModelRunner(
        ModelConfig(path=str(tiny_models["opt"]), dtype="float32"),
        CacheConfig(block_size=4, num_blocks=32, recompute_chunk_tokens=5),
    )
    cache = CacheManager(runner.layout, runner.cache.num_blocks)
    cache.allocate(0, 25, CacheType.HIDDEN)
    runner.execute(BatchPlan([SequencePlan(0, tokens[:25], 0, CacheType.HIDDEN, cache.table(0).blocks, GREEDY)]))
    conversion = cache.convert_to_kv(0, 25)
    cache.grow(0, 26)
    # A new prefill in the same step may reuse nothing of the hidden blocks until the step ends.
    cache.allocate(1, len(other), CacheType.KV)
    assert not set(cache.table(1).blocks) & set(conversion.hidden_blocks)
    plan = BatchPlan([
        SequencePlan(0, tokens[25:], 25, CacheType.KV, cache.table(0).blocks, GREEDY, conversion),
        SequencePlan(1, other, 0, CacheType.KV, cache.table(1).blocks, GREEDY),
    ])
    logits = runner.execute(plan, return_logits=True).logits
    cache.end_step()
    torch.testing.assert_close(logits[0], ref[25], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], ref_other[-1], atol=1e-4, rtol=1e-4)
    cache.free(0)
    cache.free(1)
    cache.check_invariants()
    assert cache.num_free == cache.num_blocks
