"""Triton kernels of the `triton` attention backend: variable-length paged attention and the K/V store.

On a GPU they compile for it; with `TRITON_INTERPRET=1` set before this module is imported, Triton's
interpreter runs them on CPU tensors (how the test suite checks them; slow, for small shapes only).
Only language features present in Triton 3.6 are used (the GPU machine's version; CI runs 3.9).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Whether Triton's interpreter runs these kernels (decided when `triton.jit` wraps them, at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

LOG2E = 1.4426950408889634  # scores are scaled into base 2 so that the loop uses exp2


@triton.jit(do_not_specialize=["table_stride"])  # the table width varies from step to step: one compile
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, q_start_ptr, q_len_ptr, kv_len_ptr, lse_ptr,
    qk_scale, block_size, table_stride, head_dim, group,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program: BLOCK_M queries of one sequence and one head, over that sequence's keys in tiles
    # of BLOCK_N, read from their blocks in place (no gather), with an online softmax in float32.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    n_q = tl.load(q_len_ptr + seq)
    if m0 < n_q:
        n_kv = tl.load(kv_len_ptr + seq)
        first_row = tl.load(q_start_ptr + seq)
        kv_head = head // group
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < n_q
        d_mask = offs_d < head_dim
        rows = (first_row + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # Causal: query i of the sequence sees keys 0 .. n_kv - n_q + i (its own history, then itself).
        last_visible = n_kv - n_q + offs_m
        hi = n_kv
        if CAUSAL:
            hi = tl.minimum(n_kv, n_kv - n_q + m0 + BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            block = tl.load(tables_ptr + seq * table_stride + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
            slot = offs_n % block_size
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ko + kv_head * stride_kh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = n_mask[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= last_visible[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vo + kv_head * stride_vh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        o = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # ln 2: back to natural log
        out_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        o_mask = m_mask[:, None] & d_mask[None, :]
        if ACCUMULATE:
            # Merge with the result already there (over other keys of the same queries) by log-sum-exp.
            old = tl.load(out_ptrs, mask=o_mask, other=0.0).to(tl.float32)
            old_lse = tl.load(lse_ptr + rows * stride_lt + head, mask=m_mask, other=float("-inf"))
            top = tl.maximum(old_lse, lse)
            top = tl.where(top == float("-inf"), 0.0, top)
            w_old = tl.exp(old_lse - top)
            w_new = tl.exp(lse - top)
            total = w_old + w_new
            total_safe = tl.where(total == 0.0, 1.0, total)
            o = (old * w_old[:, None] + o * w_new[:, None]) / total_safe[:, None]
            lse = tl.where(total == 0.0, float("-inf"), top + tl.log(total_safe))
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
        if WRITE_LSE:
            tl.store(lse_ptr + rows * stride_lt + head, lse, mask=m_mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, tokens_ptr, blocks_ptr, offsets_ptr,
    stride_kt, stride_vt, stride_kb, stride_ko, stride_vb, stride_vo, width,
    BLOCK: tl.constexpr,
):
    # Row `tokens[i]` of this step's K/V goes to slot (blocks[i], offsets[i]); a negative block marks a
    # padding row (CUDA-graph buckets) that is written nowhere.
    i = tl.program_id(0)
    block = tl.load(blocks_ptr + i).to(tl.int64)
    if block >= 0:
        token = tl.load(tokens_ptr + i).to(tl.int64)
        offset = tl.load(offsets_ptr + i).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        k = tl.load(k_ptr + token * stride_kt + cols, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + cols, mask=mask)
        tl.store(key_cache_ptr + block * stride_kb + offset * stride_ko + cols, k, mask=mask)
        tl.store(value_cache_ptr + block * stride_vb + offset * stride_vo + cols, v, mask=mask)


def _block_sizes(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tiles of 16 rows at least (tl.dot's minimum); larger key tiles
    on the interpreter, where each tile is one numpy operation."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if INTERPRETED or block_d <= 128 else 32
    return 16, block_n, block_d


def paged_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_len: torch.Tensor,
    max_q_len: int,
    scale: float,
    causal: bool,
    lse: torch.Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Attention of a variable-length batch over keys read from paged caches in place.

    Sequence `s` has queries `q[q_start[s] : q_start[s] + q_len[s]]` `[tokens, heads, head_dim]` and
    `kv_len[s]` keys; key `j` lies in `key_cache[block_tables[s, j // block_size], j % block_size]`
    (caches `[blocks, block_size, kv_heads, head_dim]`, any block stride). With `causal`, query `i`
    sees keys `0 .. kv_len - q_len + i`. Writes those rows of `out` (other rows are left alone) and,
    when given, their natural-log log-sum-exp into `lse` `[tokens, heads]` (float32). With
    `accumulate`, `out` (float32) and `lse` already hold a result over other keys, which is merged.
    `max_q_len` bounds `q_len` (host-known, it sizes the launch grid).
    """
    tokens, heads, head_dim = q.shape
    kv_heads = key_cache.shape[2]
    if accumulate and lse is None:
        raise ValueError("accumulate needs the log-sum-exp of the result already in `out`")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key/value heads")
    if q.stride(2) != 1 or out.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous in q, out and the caches")
    num_seqs = block_tables.shape[0]
    if num_seqs == 0 or max_q_len <= 0:
        return
    block_m, block_n, block_d = _block_sizes(head_dim)
    lse_arg = lse if lse is not None else out  # never read or written without WRITE_LSE/ACCUMULATE
    grid = (num_seqs, heads, triton.cdiv(max_q_len, block_m))
    _paged_attention_kernel[grid](
        out, q, key_cache, value_cache, block_tables, q_start, q_len, kv_len, lse_arg,
        scale * LOG2E, key_cache.shape[1], block_tables.stride(0), head_dim, heads // kv_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        CAUSAL=causal, WRITE_LSE=lse is not None, ACCUMULATE=accumulate,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or INTERPRETED else "tf32",
        UPCAST=INTERPRETED,  # the interpreter's tl.dot multiplies bfloat16 bit patterns: compute in float32
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tokens: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Write rows `tokens` of `k`/`v` `[T, kv_heads, head_dim]` into slots (`blocks`, `offsets`) of the
    caches; entries whose block is negative are skipped (padding)."""
    count = tokens.numel()
    if count == 0:
        return
    width = k.shape[1] * k.shape[2]
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError("K/V rows must be contiguous within a token")
    if key_cache.stride(3) != 1 or key_cache.stride(2) != key_cache.shape[3]:
        raise ValueError("cache slots must be contiguous")
    _store_kv_kernel[(count,)](
        k, v, key_cache, value_cache, tokens, blocks, offsets,
        k.stride(0), v.stride(0), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), width,
        BLOCK=triton.next_power_of_2(width),
    )
