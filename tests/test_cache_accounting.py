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


def test_fork_shares_full_blocks_and_copies_the_last() -> None:
    cache = CacheManager(OPT_LIKE, num_blocks=16)
    parent = cache.allocate(0, 10, CacheType.KV)  # 3 blocks of 4: tokens 8, 9 in the third
    child = cache.fork(0, 1, 10)
    assert child.block_ids[:2] == parent.block_ids[:2] and child.block_ids[2] not in parent.block_ids
    assert [cache.pool.refcount(b) for b in parent.block_ids] == [2, 2, 2]  # the third: the copy's source
    assert parent.blocks == [] and child.blocks == [child.block_ids[2]]  # what freeing each would return
    assert cache.num_free == 16 - 4
    cache.check_invariants()
    copy = cache.take_copy(1)
    assert (copy.src, copy.dst) == (parent.block_ids[2], child.block_ids[2]) and cache.take_copy(1) is None
    cache.end_step()  # the step that copied it ended: the source is the parent's alone again
    assert parent.blocks == [parent.block_ids[2]]
    cache.free(0)  # the shared blocks stay with the child
    assert cache.num_free == 16 - 3 and child.blocks == child.block_ids
    cache.check_invariants()
    cache.free(1)
    assert cache.num_free == 16
    cache.check_invariants()


def test_fork_of_a_full_last_block_copies_it_and_a_pending_copy_is_freed_with_its_holder() -> None:
    cache = CacheManager(OPT_LIKE, num_blocks=16)
    parent = cache.allocate(0, 8, CacheType.HIDDEN)  # one hidden block holds 8 tokens: it is copied
    child = cache.fork(0, 1, 8)
    assert child.block_ids != parent.block_ids and len(child.block_ids) == 1
    cache.free(0)  # the source is still held by the child's pending copy
    assert cache.num_free == 16 - 2
    cache.check_invariants()
    cache.free(1)  # never ran: its copy is dropped and the source freed
    assert cache.num_free == 16
    cache.check_invariants()


def test_pool_reference_counts() -> None:
    pool = BlockPool(4)
    [block] = pool.allocate(1, owner="a")
    pool.share([block], "b")
    with pytest.raises(BlockPoolError):
        pool.share([block], "b")  # a holder holds a block once
    pool.release([block], "a")
    assert pool.num_free == 3 and pool.refcount(block) == 1
    pool.release([block], "b")
    assert pool.num_free == 4
    with pytest.raises(BlockPoolError):
        pool.share([block], "c")  # a free block cannot be shared
    pool.check_invariants()


operation = st.tuples(
    st.sampled_from(["allocate", "grow", "free", "convert", "end_step", "fork", "copy"]),
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
        elif op == "fork" and table is not None:
            child = (seq + 1 + tokens % 5) % 6
            if cache.table(child) is None and cache.num_free >= 1:
                cache.fork(seq, child, lengths[seq])
                lengths[child] = lengths[seq]
        elif op == "copy":
            cache.take_copy(seq)
        cache.check_invariants()
        for s, n in lengths.items():
            t = cache.table(s)
            assert len(t.block_ids) == cache.blocks_needed(n, t.cache_type)
            assert set(t.blocks) <= set(t.block_ids)
        usage = cache.usage()
        assert usage.kv_blocks + usage.hidden_blocks + usage.num_free <= usage.num_blocks
    cache.end_step()
    for seq in list(lengths):
        cache.free(seq)
    cache.check_invariants()
    assert cache.num_free == cache.num_blocks, "every block is free once every request has ended"
