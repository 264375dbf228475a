"""The C++ paged-attention kernel (`cpu_paged` backend) against plain attention over gathered K/V.

The kernel is built once per checkout (build/kernels) and loaded; if it cannot be built these tests
fail — they do not skip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_cache.attention import BACKENDS, CpuPagedBackend, make_backend


def reference_attention(q, k, v, scale, causal):  # type: ignore[no-untyped-def]
    """Attention of q `[nq, h, d]` over k/v `[nk, hk, d]` (the last nq keys are the queries' own)."""
    nq, nk = q.shape[0], k.shape[0]
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else None
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


# Head sizes that reach every path: the AVX-512 loop (16, 64, 128), bf16 dot products (64, 128), the
# 16-wide tail (48) and the generic path (24).
SHAPES = [(4, 4, 16, 4), (6, 2, 64, 32), (3, 1, 24, 1), (8, 2, 128, 16), (2, 2, 48, 16), (6, 3, 64, 32)]


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"threads{n}")
def threads(request):  # type: ignore[no-untyped-def]
    """The kernel gives each work item all K/V heads of a query tile, or a run of them when there are too
    few tiles for the threads: 1 thread takes the first, 2 and 4 split heads (3 K/V heads into runs of 2
    and 1 with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), SHAPES)
def test_variable_length_batch_reads_blocks_in_place(dtype, heads, kv_heads, dim, block, threads) -> None:  # type: ignore[no-untyped-def]
    # Head sizes cover each kernel path: AVX-512 in place (multiples of 16; bf16 dot products where a
    # multiple of 32 and the CPU has AVX512-BF16; 128 = two 64-wide accumulator passes, 48 a 16-wide
    # tail) and the generic converted path (24).
    backend = CpuPagedBackend()
    g = torch.Generator().manual_seed(0)
    # Decodes, a prefill, prefills over cached context, one past a query tile (16) and a key tile (32).
    q_lens = [1, 7, 1, 20, 3, 1]
    kv_lens = [9, 7, 1, 45, 70, 33]
    num_blocks = sum(-(-n // block) for n in kv_lens) + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered, not in order
    tables, used = [], 0
    for n in kv_lens:
        count = -(-n // block)
        tables.append(order[used : used + count])
        used += count
    width = max(len(t) for t in tables) + 2  # entries past a table's end are never read
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for n in q_lens[:-1]:
        starts.append(starts[-1] + n)
    total = sum(q_lens)
    q = torch.randn(total, heads, dim, generator=g).to(dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(total, heads)
    scale = dim**-0.5
    backend._op(out, q, k_cache, v_cache, block_tables, torch.tensor(starts, dtype=torch.int32),
                torch.tensor(q_lens, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32), scale, True, lse)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for s, (start, nq, nk) in enumerate(zip(starts, q_lens, kv_lens)):
        keys = k_cache[block_tables[s, : -(-nk // block)].long()].flatten(0, 1)[:nk]
        values = v_cache[block_tables[s, : -(-nk // block)].long()].flatten(0, 1)[:nk]
        expected = reference_attention(q[start : start + nq], keys, values, scale, causal=True)
        torch.testing.assert_close(out[start : start + nq].float(), expected, **tol)
        # The log-sum-exp, for merging partial results (hidden history).
        group = heads // kv_heads
        scores = torch.einsum("qhd,khd->hqk", q[start : start + nq].float(),
                              keys.float().repeat_interleave(group, 1)) * scale
        scores = scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), float("-inf"))
        torch.testing.assert_close(lse[start : start + nq], scores.logsumexp(-1).transpose(0, 1), **tol)


def test_non_causal_call_sees_every_key_and_keeps_other_rows() -> None:
    backend = CpuPagedBackend()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(10, 1, 2, 8, generator=g)  # one row per "block", as the hidden workspace
    values = torch.randn(10, 1, 2, 8, generator=g)
    q = torch.randn(5, 4, 8, generator=g)
    out = torch.zeros(5, 4, 8)
    table = torch.tensor([[3, 4, 5, 6, 7, 8]], dtype=torch.int32)
    backend._op(out, q, keys, values, table, torch.tensor([2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                torch.tensor([6], dtype=torch.int32), 0.5, False, None)
    expected = reference_attention(q[2:4], keys[3:9, 0], values[3:9, 0], 0.5, causal=False)
    torch.testing.assert_close(out[2:4], expected, atol=1e-5, rtol=1e-5)
    assert (out[:2] == 0).all() and (out[4:] == 0).all(), "rows of other requests are left alone"


def test_backends_are_chosen_by_name() -> None:
    assert set(BACKENDS) == {"torch", "cpu_paged", "triton"}  # triton: tests/test_triton_attention.py
    assert make_backend("cpu_paged").name == "cpu_paged" and make_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_backend("flash")
