"""Sampling: greedy, temperature, top-k, top-p, and per-request seeds."""

from __future__ import annotations

import torch

from hybrid_cache.plan import SamplingParams
from worker.sampler import Sampler, filtered_probs

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def test_top_k_keeps_the_k_largest() -> None:
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[2:] == 0).all() and probs[:2].sum() == torch.tensor(1.0)
    assert torch.allclose(probs[:2], LOGITS[:2].softmax(-1))


def test_top_p_keeps_the_smallest_prefix_covering_p() -> None:
    full = LOGITS.softmax(-1)
    p = float(full[0] + full[1]) - 1e-3  # the first two tokens are needed to reach p
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=p))
    assert (probs[:2] > 0).all() and (probs[2:] == 0).all()
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=float(full[0]) / 2))
    assert probs[0] == 1.0, "the most likely token always survives"


def test_temperature_sharpens_and_flattens() -> None:
    cold = filtered_probs(LOGITS, SamplingParams(temperature=0.1))
    hot = filtered_probs(LOGITS, SamplingParams(temperature=10.0))
    assert cold[0] > 0.99 and hot.max() < 0.3


def test_greedy_is_argmax_and_seeds_are_per_request() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.device("cpu"), seed=0)
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.0, seed=42)
    batch = logits[[0, 1, 1]]
    first = [sampler.sample(batch, [0, 1, 2], [greedy, seeded, seeded]) for _ in range(20)]
    assert all(row[0] == int(logits[0].argmax()) for row in first)
    # Requests 1 and 2 share a seed and logits: equal streams, though they share the batch.
    assert [row[1] for row in first] == [row[2] for row in first]
    # A new sampler, with a different shared seed and other requests around, gives the same stream.
    other = Sampler(torch.device("cpu"), seed=99)
    unseeded = SamplingParams(temperature=1.0)
    again = [other.sample(logits[[0, 1]], [7, 1], [unseeded, seeded]) for _ in range(20)]
    assert [row[1] for row in again] == [row[1] for row in first]
    assert len({row[1] for row in first}) > 1, "sampling at temperature 1 should vary"


def test_sampling_frequencies_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler(torch.device("cpu"), seed=1)
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler.sample(logits, [0], [params])[0]] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_seeds_that_differ_by_2_to_the_32_give_different_streams() -> None:
    # torch's CPU generator keeps 32 bits of its seed: the sampler mixes all 64 bits first.
    logits = torch.zeros(1, 1000)
    streams = []
    for seed in (5, 5 + 2**32, 5 + 2**33, 2**63 - 1):
        sampler = Sampler(torch.device("cpu"), seed=0)
        params = SamplingParams(temperature=1.0, seed=seed)
        streams.append([sampler.sample(logits, [0], [params])[0] for _ in range(8)])
    assert len({tuple(s) for s in streams}) == len(streams)


def test_batched_filtering_matches_row_by_row() -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=40),
        SamplingParams(temperature=2.0, top_p=1.0, top_k=1),
    ]
    from worker.sampler import filtered_probs_batch

    batch = filtered_probs_batch(logits, params)
    for row, p in enumerate(params):
        assert torch.allclose(batch[row], _row_reference(logits[row], p))
        assert torch.allclose(batch[row].sum(), torch.tensor(1.0))
    assert (batch[1] > 0).sum() == 5 and (batch[5] > 0).sum() == 1


def _row_reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The former one-row-at-a-time filter, kept as the reference."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return scaled.softmax(-1)


def _seq(seq_id: int, tokens: list[int], start: int, params: SamplingParams, fork_of: int | None = None):
    from hybrid_cache.plan import CacheType, SequencePlan

    return SequencePlan(seq_id, tokens, start, CacheType.KV, [0], params, fork_of=fork_of)


def test_history_follows_chunks_preemption_and_forks() -> None:
    """Penalties see every token a sequence was fed: prompt chunks sent without its params, a
    re-prefill after a preemption, and the prompt a forked sample shares with its parent."""
    from hybrid_cache.plan import BatchPlan

    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.full((1, 10), 1.0)
    logits[0, 3] = 5.0  # token 3 is the favourite, and it is in the prompt (5 / 100 < 1)
    penalised = SamplingParams(temperature=0, repetition_penalty=100.0)
    greedy = SamplingParams(temperature=0)
    assert sampler.sample_step(logits, BatchPlan([_seq(0, [3, 4], 0, greedy)])) == [3]  # a chunk: no params
    assert sampler.sample_step(logits, BatchPlan([_seq(0, [5], 2, penalised)])) != [3]
    # A re-prefill of prompt + output (after a preemption) still knows token 3.
    assert sampler.sample_step(logits, BatchPlan([_seq(0, [3, 4, 5, 0], 0, penalised)])) != [3]
    # A sample forked from sequence 0 after its prompt [3, 4, 5] recomputes the last prompt token.
    assert sampler.sample_step(logits, BatchPlan([_seq(1, [5], 2, penalised, fork_of=0)])) != [3]
    # Without the fork it would not know the prompt.
    assert sampler.sample_step(logits, BatchPlan([_seq(2, [5], 2, penalised)])) == [3]
