"""One validation of sampling values (`SamplingParams`): poison values are refused with an error that
names the field, accepted values are normalised the way vLLM does, and the plan codec carries every
accepted value unchanged (so the sampler sees exactly what was validated)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_cache.plan import MAX_INT64, SAMPLING_EPS, BatchPlan, CacheType, SamplingParams, SequencePlan
from hybrid_cache.plan_codec import decode_plan, encode_plan

BELOW_EPS = math.nextafter(SAMPLING_EPS, 0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", float("-inf")),
        ("temperature", -1e-9),
        ("temperature", "0.5"),
        ("temperature", True),
        ("temperature", None),
        ("top_p", float("nan")),
        ("top_p", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.0000001),
        ("top_p", "1"),
        ("top_k", -2),
        ("top_k", 2**63),
        ("top_k", 1.5),
        ("top_k", True),
        ("seed", 2**64),
        ("seed", 2**63),
        ("seed", -1),
        ("seed", 3.0),
        ("seed", False),
        ("max_tokens", 0),
        ("max_tokens", 5.0),
        ("max_tokens", True),
        ("max_tokens", float("nan")),
        ("stop", [""]),
        ("stop", [3]),
        ("stop", 7),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", "12"),
        ("ignore_eos", "false"),
    ],
)
def test_poison_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, BELOW_EPS, 0.0, -0.0])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=0.3, top_k=5, seed=3)
    assert params.greedy and params.temperature == 0.0 and math.copysign(1, params.temperature) == 1
    assert (params.top_p, params.top_k) == (1.0, 0), "filters cannot change an argmax: normalised off"


def test_normalisation() -> None:
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    assert SamplingParams(top_k=-1).top_k == 0, "vLLM's -1 means off, as 0 does"
    params = SamplingParams(temperature=1, max_tokens=np.int64(4), stop="x", stop_token_ids=[np.int32(7)])
    assert type(params.temperature) is float and type(params.max_tokens) is int
    assert params.stop == ("x",) and params.stop_token_ids == (7,) and type(params.stop_token_ids[0]) is int
    assert SamplingParams(seed=MAX_INT64).seed == MAX_INT64 and SamplingParams(seed=0).seed == 0


def _plan(params: list[SamplingParams]) -> BatchPlan:
    seqs = [SequencePlan(i, [5], 0, CacheType.KV, [i], p) for i, p in enumerate(params)]
    return BatchPlan(seqs)


EDGES = {
    "temperature": [0.0, 1e-40, BELOW_EPS, SAMPLING_EPS, math.nextafter(SAMPLING_EPS, 1.0), 0.7, 1.0, 2.0, 1e300],
    "top_p": [5e-324, 1e-9, 0.5, math.nextafter(1.0, 0.0), 1.0],
    "top_k": [-1, 0, 1, 50, 2**31, MAX_INT64],
    "seed": [None, 0, 1, 2**32, 2**32 + 1, MAX_INT64],
}


def test_codec_round_trip_of_every_accepted_edge_value() -> None:
    """The property: for every accepted combination, decode(encode(p)) carries p's sampling fields."""
    combos = [
        SamplingParams(temperature=t, top_p=p, top_k=k, seed=s) for t, p, k, s in itertools.product(*EDGES.values())
    ]
    rng = random.Random(0)
    combos += [
        SamplingParams(temperature=rng.uniform(0, 3) * rng.choice([1, 1e-6]), top_p=rng.uniform(1e-12, 1.0),
                       top_k=rng.randint(-1, 10**6), seed=rng.choice([None, rng.randint(0, MAX_INT64)]))
        for _ in range(500)
    ]
    decoded = decode_plan(encode_plan(_plan(combos)))
    for original, seq in zip(combos, decoded.seqs, strict=True):
        got = seq.sampling
        fields = ("temperature", "top_p", "top_k", "seed")
        assert [getattr(got, f) for f in fields] == [getattr(original, f) for f in fields], original
        assert got.greedy == original.greedy


@given(
    temperature=st.floats(0.0, 1e6, allow_nan=False) | st.sampled_from([1e-40, BELOW_EPS, SAMPLING_EPS]),
    top_p=st.floats(0.0, 1.0, exclude_min=True),
    top_k=st.integers(-1, MAX_INT64),
    seed=st.none() | st.integers(0, MAX_INT64),
)
@settings(max_examples=300, deadline=None)
def test_codec_round_trip_property(temperature: float, top_p: float, top_k: int, seed: int | None) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    got = decode_plan(encode_plan(_plan([params]))).seqs[0].sampling
    fields = ("temperature", "top_p", "top_k", "seed")
    assert [getattr(got, f) for f in fields] == [getattr(params, f) for f in fields]
    assert got == SamplingParams(temperature=got.temperature, top_p=got.top_p, top_k=got.top_k, seed=got.seed)
