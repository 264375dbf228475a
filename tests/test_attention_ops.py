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
