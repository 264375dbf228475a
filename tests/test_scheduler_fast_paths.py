"""The scheduler's and engine's shortcuts (taken for speed, `bench/simulator/speed.py`) decide exactly as
the general code they skip: each is checked against that code on random cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_cache.layout import CacheLayout
from hybrid_cache.manager import CacheManager
from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service import knapsack
from scheduler_service.metrics import meets_slo
from scheduler_service.request import Request


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1e-6, 50.0), st.integers(1, 40)), min_size=1, max_size=12),
    st.integers(0, 3),
    st.booleans(),
)
def test_the_all_kv_shortcut_decides_as_the_knapsack(rows: list[tuple[float, int]], slack: int, nan: bool) -> None:
    """KV choices only (hidden NaN, or worth nothing), all positive, all fitting: every request keeps KV,
    as the full greedy decides when the shortcut is turned off."""
    value_kv = np.array([v for v, _ in rows])
    blocks_kv = np.array([b for _, b in rows], dtype=np.int64)
    value_hidden = np.full(len(rows), np.nan) if nan else -value_kv
    blocks_hidden = np.zeros_like(blocks_kv)
    capacity = int(blocks_kv.sum()) + slack
    assert knapsack._all_kv_fit(value_kv, blocks_kv, value_hidden, capacity)
    fast = knapsack.choose_codes(value_kv, blocks_kv, value_hidden, blocks_hidden, capacity)
    original = knapsack._all_kv_fit
    try:
        knapsack._all_kv_fit = lambda *args: False  # type: ignore[assignment]
        general = knapsack.choose_codes(value_kv, blocks_kv, value_hidden, blocks_hidden, capacity)
    finally:
        knapsack._all_kv_fit = original
    assert fast.tolist() == general.tolist() == [knapsack.CODE_KV] * len(rows)


def test_the_all_kv_shortcut_is_not_taken_when_it_could_be_wrong() -> None:
    blocks = np.array([3, 4], dtype=np.int64)
    nan = np.full(2, np.nan)
    assert not knapsack._all_kv_fit(np.array([1.0, 2.0]), blocks, nan, 6)  # they do not fit together
    assert not knapsack._all_kv_fit(np.array([1.0, 0.0]), blocks, nan, 7)  # a value that is not positive
    assert not knapsack._all_kv_fit(np.array([1.0, 2.0]), blocks, np.array([np.nan, 0.5]), 7)  # a hidden choice


@settings(max_examples=500, deadline=None)
@given(st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300), st.floats(0.01, 1.0))
def test_meets_slo_with_its_shortcut_equals_the_percentile(gaps: list[float], tbt: float) -> None:
    times = np.cumsum([0.5, *gaps]).tolist()
    request = Request("r", 0, [1], SamplingParams(), arrival_time=0.0, ttft_slo_s=1.0, tbt_slo_s=tbt)
    request.token_times = times
    expected = float(np.percentile(np.diff(times), 99)) <= tbt
    assert meets_slo(request) == expected


@pytest.mark.parametrize("prompt_len, outputs", [(5, 0), (5, 3), (1, 7), (12, 12)])
def test_token_ids_at_is_a_slice_of_all_token_ids(prompt_len: int, outputs: int) -> None:
    request = Request("r", 0, list(range(100, 100 + prompt_len)), SamplingParams(), arrival_time=0.0)
    request.output_token_ids = list(range(200, 200 + outputs))
    whole = request.all_token_ids
    for start in range(len(whole) + 1):
        for count in range(len(whole) - start + 2):
            assert request.token_ids_at(start, count) == whole[start : start + count]


@pytest.mark.parametrize("cache_type", [CacheType.KV, CacheType.HIDDEN])
def test_cache_manager_counts_blocks_as_the_layout(cache_type: CacheType) -> None:
    layout = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=16, dtype_bytes=2)
    cache = CacheManager(layout, 1000)
    cache.allocate(0, 1, cache_type)
    for tokens in range(0, 400):
        assert cache.blocks_needed(tokens, cache_type) == layout.blocks_needed(tokens, cache_type)
        assert cache.tokens_per_block(cache_type) == layout.tokens_per_block(cache_type)
        assert cache.blocks_to_hold(0, tokens) == max(0, layout.blocks_needed(tokens, cache_type) - 1)
