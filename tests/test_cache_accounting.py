"""Block pool and block tables: invariants under random operation sequences, and the layout's sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_cache import BlockPool, BlockPoolError, CacheLayout, CacheManager, CacheType, HiddenCacheUnavailable

OPT_LIKE = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=4, dtype_bytes=4)
GQA = CacheLayout(num_layers=2, hidden_size=576, num_kv_heads=3, head_dim=64, block_size=32, dtype_bytes=2)


def test_layout_of_multi_head_model() -> None:
    assert OPT_LIKE.ratio == 0.5
    kv = OPT_LIKE.bytes_per_token_per_layer(CacheType.KV)
    hidden = OPT_LIKE.bytes_per_token_per_layer(CacheType.HIDDEN)
    assert hidden == OPT_LIKE.ratio * kv
    assert OPT_LIKE.tokens_per_block(CacheType.HIDDEN) == 2 * OPT_LIKE.tokens_per_block(CacheType.KV)
    assert OPT_LIKE.blocks_needed(9, CacheType.KV) == 3
    assert OPT_LIKE.blocks_needed(9, CacheType.HIDDEN) == 2


def test_layout_of_grouped_query_model() -> None:
    assert GQA.ratio == pytest.approx(1.5)
    assert not GQA.hidden_allowed
    with pytest.raises(HiddenCacheUnavailable, match="hidden cache"):
        GQA.tokens_per_block(CacheType.HIDDEN)


def test_budget_includes_workspace() -> None:
    budget = 100 * OPT_LIKE.block_bytes
    blocks = OPT_LIKE.num_blocks_for_budget(budget, chunk_tokens=64)
    assert blocks * OPT_LIKE.block_bytes + OPT_LIKE.workspace_bytes(64) <= budget
    assert (blocks + 1) * OPT_LIKE.block_bytes + OPT_LIKE.workspace_bytes(64) > budget
    with pytest.raises(ValueError, match="holds no block"):
        OPT_LIKE.num_blocks_for_budget(OPT_LIKE.workspace_bytes(64), chunk_tokens=64)


def test_pool_refuses_double_free_and_foreign_release() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2, owner="a")
    with pytest.raises(BlockPoolError):
        pool.release(blocks, owner="b")
    pool.release(blocks, owner="a")
    with pytest.raises(BlockPoolError):
        pool.release(blocks, owner="a")
    with pytest.raises(BlockPoolError):
        pool.allocate(5, owner="a")
    pool.check_invariants()


operation = st.tuples(
    st.sampled_from(["allocate", "grow", "free", "convert", "end_step"]),
    st.integers(0, 5),  # request
    st.integers(1, 40),  # tokens
    st.sampled_from([CacheType.KV, CacheType.HIDDEN]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=60))
def test_random_operations_keep_invariants(ops: list[tuple[str, int, int, CacheType]]) -> None:
    cache = CacheManager(OPT_LIKE, num_blocks=24)
    lengths: dict[int, int] = {}
    for op, seq, tokens, cache_type in ops:
        table = cache.table(seq)
        if op == "allocate" and table is None:
            if cache.blocks_needed(tokens, cache_type) <= cache.num_free:
                cache.allocate(seq, tokens, cache_type)
                lengths[seq] = tokens
        elif op == "grow" and table is not None:
            target = lengths[seq] + tokens
            if cache.blocks_to_hold(seq, target) <= cache.num_free:
                cache.grow(seq, target)
                lengths[seq] = target
        elif op == "free":
            cache.free(seq)
            lengths.pop(seq, None)
        elif op == "convert" and table is not None and table.cache_type is CacheType.HIDDEN:
            if cache.blocks_needed(lengths[seq], CacheType.KV) <= cache.num_free:
                conversion = cache.convert_to_kv(seq, lengths[seq])
                assert not set(conversion.kv_blocks) & set(conversion.hidden_blocks)
        elif op == "end_step":
            cache.end_step()
        cache.check_invariants()
        for s, n in lengths.items():
            t = cache.table(s)
            assert len(t.blocks) == cache.blocks_needed(n, t.cache_type)
        usage = cache.usage()
        assert usage.kv_blocks + usage.hidden_blocks + usage.num_free <= usage.num_blocks
    cache.end_step()
    for seq in list(lengths):
        cache.free(seq)
    cache.check_invariants()
    assert cache.num_free == cache.num_blocks, "every block is free once every request has ended"
