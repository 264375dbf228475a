"""Attention over a mixed batch, and the recompute of K/V from the hidden cache.

KV requests attend over K/V read from their own blocks. Hidden requests attend over K/V recomputed
from their stored `x`, chunk by chunk through the fixed workspace, merged with an online softmax, so
no request ever reads K/V that was not produced from its own history in this step.

Three backends implement the same interface (`AttentionBackend`): `torch`, the readable reference
(gather whole blocks, then PyTorch's SDPA), `cpu_paged`, our C++ kernel (csrc/) that reads
K/V where they lie over the whole variable-length batch, and `triton` (attention_triton.py), the same
calls as Triton kernels for GPUs. A backend builds its own step metadata
from the plan and, per layer, gets the layer's cache, that metadata and q/k/v, and returns the
output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from hybrid_cache.kernels import load as load_kernels
from hybrid_cache.layout import CacheLayout
from hybrid_cache.metadata import AttentionMetadata, build_metadata
from hybrid_cache.paged_metadata import StepBuffers, build_paged
from hybrid_cache.plan import BatchPlan
from hybrid_cache.tensors import LayerCache, RecomputeWorkspace


class ProjectKV(Protocol):
    """A layer's K/V projection: write `[k | v]` for rows `x` (rotary applied at `positions`) into `out`."""

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None: ...


def store(layer: LayerCache, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
    """Write this step's K/V (KV requests) and x (hidden requests) into their cache slots."""
    if meta.kv_write_tokens.numel():
        layer.keys[meta.kv_write_blocks, meta.kv_write_offsets] = k[meta.kv_write_tokens]
        layer.values[meta.kv_write_blocks, meta.kv_write_offsets] = v[meta.kv_write_tokens]
    if meta.hidden_write_tokens.numel():
        assert layer.hidden is not None, "hidden rows planned for a model without a hidden cache"
        layer.hidden[meta.hidden_write_rows] = x[meta.hidden_write_tokens]


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q `[nq, nh, d]` over k/v `[nk, nkv, d]` in float32, with its log-sum-exp.

    Returns `(out [nq, nh, d], lse [nh, nq])`. With `causal`, query i sees keys `0..i + nk - nq`.
    """
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).float()
    kh = k.transpose(0, 1).float().repeat_interleave(group, 0)
    vh = v.transpose(0, 1).float().repeat_interleave(group, 0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale
    if causal:
        nq, nk = q.shape[0], k.shape[0]
        hidden = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(nk - nq + 1)
        scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vh)
    return out.transpose(0, 1), lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets into the result over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).transpose(0, 1).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).transpose(0, 1).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def _recompute(
    layer: LayerCache, workspace: RecomputeWorkspace, rows: torch.Tensor, positions: torch.Tensor, project_kv: ProjectKV
) -> torch.Tensor:
    """K/V `[n, 2, nkv, d]` of hidden rows, computed into the workspace (valid until the next call)."""
    assert layer.hidden is not None
    n = rows.numel()
    with workspace.timer.measure("recompute"):
        x = workspace.x[:n]
        torch.index_select(layer.hidden, 0, rows, out=x)
        kv = workspace.kv[:n]
        project_kv(x, positions, kv)
    return kv.view(n, 2, -1, layer.keys.shape[-1])


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Whole blocks of keys (or values) `[..., blocks * block_size, nkv, d]` for block tables `[..., blocks]`."""
    gathered = cache.index_select(0, block_tables.flatten())
    return gathered.view(*block_tables.shape[:-1], -1, *cache.shape[2:])


def convert_to_kv(
    layer: LayerCache, workspace: RecomputeWorkspace, meta: AttentionMetadata, project_kv: ProjectKV
) -> None:
    """Hidden→KV in place for this layer: project K/V from stored x into the new KV blocks."""
    for chunk in meta.conversions:
        kv = _recompute(layer, workspace, chunk.rows, chunk.positions, project_kv)
        layer.keys[chunk.kv_blocks, chunk.kv_offsets] = kv[:, 0]
        layer.values[chunk.kv_blocks, chunk.kv_offsets] = kv[:, 1]


def hybrid_attention(
    layer: LayerCache,
    workspace: RecomputeWorkspace,
    meta: AttentionMetadata,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    project_kv: ProjectKV,
    scale: float,
) -> torch.Tensor:
    """Attention output `[T, nh, d]` for every token of the step; call after `store`."""
    out = torch.empty_like(q)

    group = meta.kv_decode
    if group is not None:
        keys = _gather(layer.keys, group.block_tables).transpose(1, 2)  # [B, nkv, L, d]
        values = _gather(layer.values, group.block_tables).transpose(1, 2)
        queries = q[group.token_index].unsqueeze(2)
        result = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=True
        )
        out[group.token_index] = result.squeeze(2)

    for span in meta.kv_spans:
        queries = q[span.begin : span.end].transpose(0, 1)
        if span.context_blocks is None:
            keys, values = k[span.begin : span.end], v[span.begin : span.end]
            mask, causal = None, True
        else:
            nq = span.end - span.begin
            nk = span.start_pos + nq
            keys = _gather(layer.keys, span.context_blocks)[:nk]
            values = _gather(layer.values, span.context_blocks)[:nk]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            causal = False
        result = F.scaled_dot_product_attention(
            queries, keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[span.begin : span.end] = result.transpose(0, 1)

    if meta.hidden_spans:
        _hidden_attention(layer, workspace, meta, q, k, v, project_kv, scale, out)
    return out


def _hidden_attention(
    layer: LayerCache,
    workspace: RecomputeWorkspace,
    meta: AttentionMetadata,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    project_kv: ProjectKV,
    scale: float,
    out: torch.Tensor,
) -> None:
    # Each hidden request: attention over its new tokens (K/V fresh from this step), merged with
    # attention over its history, recomputed chunk by chunk from x.
    partial: list[tuple[torch.Tensor, torch.Tensor]] = []
    for span in meta.hidden_spans:
        s = slice(span.begin, span.end)
        partial.append(attend_with_lse(q[s], k[s], v[s], scale, causal=True))
    for chunk in meta.hidden_history:
        kv = _recompute(layer, workspace, chunk.rows, chunk.positions, project_kv)
        for span_index, begin, end in chunk.pieces:
            span = meta.hidden_spans[span_index]
            # History positions all precede the span's queries, so no mask is needed.
            piece = attend_with_lse(q[span.begin : span.end], kv[begin:end, 0], kv[begin:end, 1], scale, causal=False)
            partial[span_index] = merge(*partial[span_index], *piece)
    for span, (result, _) in zip(meta.hidden_spans, partial):
        out[span.begin : span.end] = result.to(out.dtype)


class AttentionBackend:
    """How attention runs: step metadata from a plan (host side, once per step), then one call per layer.

    `forward` stores this step's K/V (KV requests) and x (hidden requests) in the layer's cache and
    returns the attention output `[T, heads, head_dim]` of every token of the step.
    """

    name: ClassVar[str]

    def build_metadata(
        self, plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype
    ) -> AttentionMetadata:
        raise NotImplementedError

    def forward(
        self,
        layer: LayerCache,
        workspace: RecomputeWorkspace,
        meta: AttentionMetadata,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        project_kv: ProjectKV,
        scale: float,
    ) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(AttentionBackend):
    """The reference: whole blocks gathered, padded and masked, PyTorch's SDPA; hidden history in chunks."""

    name = "torch"

    def build_metadata(
        self, plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype
    ) -> AttentionMetadata:
        return build_metadata(plan, layout, chunk_tokens, dtype)

    def forward(self, layer, workspace, meta, q, k, v, x, project_kv, scale):  # type: ignore[no-untyped-def]
        store(layer, meta, k, v, x)
        return hybrid_attention(layer, workspace, meta, q, k, v, project_kv, scale)


class CpuPagedBackend(AttentionBackend):
    """Our C++ paged-attention kernel (`torch.ops.aptserve.paged_attention`, built from csrc/).

    KV requests — decodes and prefills, with or without cached context — attend in one call that reads
    K/V from the blocks in place. Hidden requests: one call over their own new tokens (causal), then per
    workspace pass one recompute of every history row that fits (one gather, one projection) and one
    call over it, merged by log-sum-exp; a pass holds many requests, so there is no loop per request.
    """

    name = "cpu_paged"

    def __init__(self) -> None:
        load_kernels()
        self._op = torch.ops.aptserve.paged_attention
        self._store_kv = torch.ops.aptserve.store_kv
        self._buffers = StepBuffers()  # the step's index arrays, updated in place from step to step

    def build_metadata(
        self, plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype
    ) -> AttentionMetadata:
        return build_paged(plan, layout, chunk_tokens, self._buffers)

    def forward(self, layer, workspace, meta, q, k, v, x, project_kv, scale):  # type: ignore[no-untyped-def]
        paged = meta.paged
        assert paged is not None and paged.slots is not None, "metadata built for another backend"
        self._store_kv(layer.keys, layer.values, k, v, paged.slots)  # one pass; hidden tokens have no slot
        if meta.hidden_write_tokens.numel():
            assert layer.hidden is not None, "hidden rows planned for a model without a hidden cache"
            layer.hidden[meta.hidden_write_rows] = x[meta.hidden_write_tokens]
        out = torch.empty_like(q)
        if paged.kv is not None:
            b = paged.kv
            self._op(out, q, layer.keys, layer.values, b.block_tables, b.q_start, b.q_len, b.kv_len, scale, True, None)
        if paged.hidden_new is not None:
            self._hidden(layer, workspace, paged, q, k, v, project_kv, scale, out)
        return out

    def _hidden(self, layer, workspace, paged, q, k, v, project_kv, scale, out) -> None:  # type: ignore[no-untyped-def]
        # Attention over the new tokens themselves (their K/V from this step, addressed one row per
        # "block"), then over each pass of recomputed history, merged by log-sum-exp in float32.
        n, heads, dim = q.shape
        acc = torch.empty(n, heads, dim, dtype=torch.float32)
        lse = torch.empty(n, heads, dtype=torch.float32)
        b = paged.hidden_new
        self._op(acc, q, k.unsqueeze(1), v.unsqueeze(1), b.block_tables, b.q_start, b.q_len, b.kv_len, scale, True, lse)
        if paged.hidden_passes:
            part = torch.empty_like(acc)
            part_lse = torch.empty_like(lse)
            for hidden_pass in paged.hidden_passes:
                kv = _recompute(layer, workspace, hidden_pass.rows, hidden_pass.positions, project_kv)
                keys, values = kv[:, 0].unsqueeze(1), kv[:, 1].unsqueeze(1)  # one row per "block"
                p = hidden_pass.batch
                self._op(part, q, keys, values, p.block_tables, p.q_start, p.q_len, p.kv_len, scale, False, part_lse)
                t = hidden_pass.tokens
                lse_a, lse_b = lse[t], part_lse[t]
                total = torch.logaddexp(lse_a, lse_b)
                weight_a, weight_b = torch.exp(lse_a - total).unsqueeze(-1), torch.exp(lse_b - total).unsqueeze(-1)
                acc[t] = acc[t] * weight_a + part[t] * weight_b
                lse[t] = total
        t = paged.hidden_tokens
        out[t] = acc[t].to(out.dtype)


def _triton_backend() -> AttentionBackend:
    # Imported when chosen: Triton is heavy to import, and its kernels are wrapped at import time
    # (TRITON_INTERPRET decides then whether they run on CPU tensors).
    from hybrid_cache.attention_triton import TritonBackend

    return TritonBackend()


BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": TorchBackend, "cpu_paged": CpuPagedBackend, "triton": _triton_backend,
}


def make_backend(name: str) -> AttentionBackend:
    """The backend called `name` (`cache.attention_backend`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name]()
