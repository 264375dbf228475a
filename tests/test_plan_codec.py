"""The plan codec (hybrid_cache/plan_codec.py): every field a rank reads survives a round trip, a
step's sampling settings travel once per distinct value, the per-object row cache cannot hand one
request another's settings, arrays that do not hold exactly one plan are refused, and a rank's timings
ride along with its answer."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan
from hybrid_cache.plan_codec import decode_plan, decode_timings, encode_plan, encode_timings

GREEDY = SamplingParams(temperature=0.0)
RICH = SamplingParams(
    temperature=0.7, top_p=0.9, top_k=5, seed=2**63 - 1, stop_token_ids=(7, 9), logit_bias={3: -1.5, 11: 100.0},
    presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.1, min_p=0.05, min_tokens=4, logprobs=3,
    ignore_eos=True,
)


def rich_plan() -> BatchPlan:
    return BatchPlan(
        [
            SequencePlan(3, [11, 12, 13], 0, CacheType.KV, [4, 5], GREEDY, prompt_logprobs=2),
            SequencePlan(7, [21], 40, CacheType.HIDDEN, [1, 2, 9], RICH, Conversion([1], [6, 8], 16)),
            SequencePlan(8, [22], 40, CacheType.KV, [], RICH, Conversion([], [], 0), fork_of=7),
            SequencePlan(2**40, [], 0, CacheType.KV, [10], GREEDY),
        ],
        finished_seq_ids=[2, 5],
        block_copies=[(4, 12), (5, 13)],
    )


def sampling_fields(params: SamplingParams) -> dict[str, object]:
    """What the sampler reads (max_tokens and stop strings stay with the engine)."""
    return {name: getattr(params, name) for name in (
        "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens", "logprobs")}


def test_every_field_a_rank_reads_survives_a_round_trip() -> None:
    plan = rich_plan()
    got = decode_plan(encode_plan(plan))
    assert got.finished_seq_ids == plan.finished_seq_ids and got.block_copies == plan.block_copies
    assert len(got.seqs) == len(plan.seqs)
    for sent, seq in zip(plan.seqs, got.seqs, strict=True):
        assert (seq.seq_id, seq.token_ids, seq.start_pos, seq.cache_type, seq.block_table) == (
            sent.seq_id, sent.token_ids, sent.start_pos, sent.cache_type, sent.block_table)
        assert (seq.conversion, seq.fork_of, seq.prompt_logprobs) == (sent.conversion, sent.fork_of,
                                                                       sent.prompt_logprobs)
        assert sampling_fields(seq.sampling) == sampling_fields(sent.sampling)
        assert type(seq.token_ids) is list and type(seq.block_table) is list


def test_the_plan_travels_as_two_flat_arrays() -> None:
    arrays = encode_plan(rich_plan())
    assert sorted(arrays) == ["floats", "ints"]
    assert arrays["ints"].dtype == np.int64 and arrays["floats"].dtype == np.float64
    assert arrays["ints"].ndim == arrays["floats"].ndim == 1


def test_an_empty_plan_round_trips() -> None:
    assert decode_plan(encode_plan(BatchPlan([], [4]))) == BatchPlan([], [4])
    assert decode_plan(encode_plan(BatchPlan([]))) == BatchPlan([])


def test_equal_sampling_settings_travel_once_per_step() -> None:
    # Four requests, each with its own object: two distinct values.
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.5),
              SamplingParams(temperature=0.5)]
    plan = BatchPlan([SequencePlan(i, [i], 0, CacheType.KV, [i], p) for i, p in enumerate(params)])
    arrays = encode_plan(plan)
    assert arrays["ints"][1] == 2, "the sampling table holds each distinct setting once"
    decoded = decode_plan(arrays)
    assert [s.sampling.temperature for s in decoded.seqs] == [0.0, 0.0, 0.5, 0.5]
    assert decoded.seqs[0].sampling is decoded.seqs[1].sampling  # built once on the rank


def test_a_new_object_is_never_given_a_cached_row_of_another() -> None:
    """Rows are cached by object; many short-lived objects (whose ids Python reuses) each keep their own."""
    for seed in range(300):
        params = SamplingParams(temperature=1.0, seed=seed)
        got = decode_plan(encode_plan(BatchPlan([SequencePlan(1, [1], 0, CacheType.KV, [0], params)])))
        assert got.seqs[0].sampling.seed == seed


@pytest.mark.parametrize(
    "damage",
    [
        lambda a: {**a, "ints": a["ints"][:-1]},
        lambda a: {**a, "ints": np.append(a["ints"], 0)},
        lambda a: {**a, "floats": a["floats"][:-1]},
        lambda a: {**a, "ints": a["ints"][:3]},
    ],
    ids=["truncated", "trailing", "floats-short", "no-counts"],
)
def test_arrays_that_hold_no_whole_plan_are_refused(damage) -> None:  # noqa: ANN001 - a lambda
    with pytest.raises(ValueError, match="malformed plan"):
        decode_plan(damage(encode_plan(rich_plan())))


def test_a_ranks_timings_ride_along_and_come_back() -> None:
    totals = {"model": 1.25, "attention": 0.5, "recompute": 2.0**-40}
    arrays = encode_timings(totals)
    assert len(arrays) == 2  # names and seconds, however many timers there are
    assert decode_timings(arrays) == totals
    assert decode_timings(encode_timings({})) == {}
    assert decode_timings({"tokens": np.zeros(2, np.int64)}) == {}  # an answer without timings
    with pytest.raises(ValueError, match="comma"):
        encode_timings({"a,b": 1.0})
