"""The attention building blocks: log-sum-exp attention and its merge equal attention over all keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_cache.attention import attend_with_lse, merge


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_split_keys_merge_to_full_attention(heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    nq, nk, d = 3, 23, 8
    q = torch.randn(nq, heads, d, generator=g)
    k = torch.randn(nk, kv_heads, d, generator=g)
    v = torch.randn(nk, kv_heads, d, generator=g)
    scale = d**-0.5
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale, enable_gqa=True
    ).transpose(0, 1)
    out, lse = attend_with_lse(q, k[:10], v[:10], scale, causal=False)
    for begin, end in [(10, 11), (11, 20), (20, nk)]:
        out, lse = merge(out, lse, *attend_with_lse(q, k[begin:end], v[begin:end], scale, causal=False))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_causal_offset_when_queries_are_the_last_keys() -> None:
    g = torch.Generator().manual_seed(1)
    nq, nk, d = 4, 9, 8
    q = torch.randn(nq, 2, d, generator=g)
    k = torch.randn(nk, 2, d, generator=g)
    v = torch.randn(nk, 2, d, generator=g)
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3
    ).transpose(0, 1)
    out, _ = attend_with_lse(q, k, v, 0.3, causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- the per-step ops of csrc/cache_ops.cpp and the persistent step buffers ---------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_equal_argmax(dtype: torch.dtype) -> None:
    from hybrid_cache.kernels import greedy_tokens

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 1003, generator=g).to(dtype)
    logits[1, :] = 0.0  # all equal: the first wins
    logits[2, 700] = logits[2, 5] = 50.0  # a tie: the first wins
    logits[3, 17] = logits[3, 400] = float("nan")  # the first NaN wins
    logits[4, :] = float("-inf")
    logits[5, -1] = 80.0  # the maximum in the scalar tail
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    wide = logits[:, 1:]  # a row stride that is not the row length
    assert torch.equal(greedy_tokens(wide), wide.argmax(dim=-1))


def test_store_kv_writes_only_slotted_tokens() -> None:
    from hybrid_cache.kernels import load

    load()
    blocks, block_size, heads, dim = 5, 4, 3, 8
    buffer = torch.zeros(blocks, 2, block_size, heads, dim)
    keys, values = buffer[:, 0], buffer[:, 1]
    qkv = torch.randn(6, 3 * heads * dim)  # k and v are strided views, as the layers make them
    k = qkv[:, heads * dim : 2 * heads * dim].view(6, heads, dim)
    v = qkv[:, 2 * heads * dim :].view(6, heads, dim)
    slots = torch.tensor([0, 7, -1, 19, 4, -1], dtype=torch.int32)
    torch.ops.aptserve.store_kv(keys, values, k, v, slots)
    expected = torch.zeros_like(buffer)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 0, slot % block_size] = k[token]
            expected[slot // block_size, 1, slot % block_size] = v[token]
    assert torch.equal(buffer, expected)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.aptserve.store_kv(keys, values, k, v, torch.full((6,), 20, dtype=torch.int32))


def test_step_buffers_rewrite_only_changed_rows_and_match_fresh_metadata() -> None:
    from hybrid_cache.layout import CacheLayout
    from hybrid_cache.paged_metadata import StepBuffers, build_paged
    from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, SequencePlan

    layout = CacheLayout(num_layers=1, hidden_size=16, num_kv_heads=2, head_dim=8, block_size=4, dtype_bytes=4)
    tables = {0: [3, 1], 1: [7], 2: [2, 5, 6]}
    lengths = {0: 6, 1: 2, 2: 9}
    buffers = StepBuffers()

    def plan() -> BatchPlan:
        return BatchPlan([SequencePlan(i, [11], lengths[i], CacheType.KV, list(tables[i]), SamplingParams())
                          for i in sorted(tables)])

    def same(a, b) -> None:  # type: ignore[no-untyped-def]
        for name in ("block_tables", "q_start", "q_len", "kv_len"):
            x, y = getattr(a.paged.kv, name), getattr(b.paged.kv, name)
            assert torch.equal(x, y), name
        assert torch.equal(a.paged.slots, b.paged.slots) and torch.equal(a.positions, b.positions)

    same(build_paged(plan(), layout, 16, buffers), build_paged(plan(), layout, 16))
    assert buffers.rows_rewritten == 3
    lengths = {i: n + 1 for i, n in lengths.items()}
    same(build_paged(plan(), layout, 16, buffers), build_paged(plan(), layout, 16))
    assert buffers.rows_rewritten == 0  # a decode step inside the blocks it has: no table row written
    tables[1] = [7, 0]  # sequence 1 gains a block; sequence 0 has its last block replaced (copy-on-write)
    tables[0] = [3, 4]
    meta = build_paged(plan(), layout, 16, buffers)
    same(meta, build_paged(plan(), layout, 16))
    assert buffers.rows_rewritten == 2
    assert meta.paged.slots.tolist() == [4 * 4 + 3, 7 * 4 + 3, 6 * 4 + 2]
    del tables[1]  # a sequence leaves: the rows after it shift and are rewritten
    same(build_paged(plan(), layout, 16, buffers), build_paged(plan(), layout, 16))
