"""The `triton` attention backend: paged attention in Triton kernels, for GPUs (docs/GPU.md).

It follows the `cpu_paged` backend call for call, with Triton kernels in place of the C++ one:

- KV requests — decodes, prompts and prompt chunks over cached context, in one mixed batch — attend
  in one launch that reads K/V from their blocks in place (causal within the new tokens).
- Hidden requests: one launch over their own new tokens (causal), then per workspace pass one
  gather of x rows, one K/V projection into the workspace and one launch of the same kernel over it,
  merged into the running result by log-sum-exp inside the kernel.
- This step's K/V are written to their slots by a Triton kernel that skips negative blocks, so
  padded rows of a CUDA-graph bucket (worker/cuda_graphs.py) write nothing.

The metadata is the `cpu_paged` metadata plus the longest query run of each launch, known on the host
(it sizes the launch grid without reading a device tensor back).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hybrid_cache.attention import AttentionBackend, _recompute
from hybrid_cache.layout import CacheLayout
from hybrid_cache.metadata import AttentionMetadata, build_metadata
from hybrid_cache.plan import BatchPlan, CacheType
from hybrid_cache.triton_kernels import INTERPRETED, paged_attention, store_kv


@dataclass
class TritonMetadata(AttentionMetadata):
    """`cpu_paged` metadata plus the longest new-token run of the KV launch and of the hidden launches."""

    max_q_kv: int = 0
    max_q_hidden: int = 0


def triton_metadata(meta: AttentionMetadata, max_q_kv: int, max_q_hidden: int) -> TritonMetadata:
    """`meta` (paged) with the launch bounds added."""
    values = {f.name: getattr(meta, f.name) for f in fields(AttentionMetadata)}
    return TritonMetadata(**values, max_q_kv=max_q_kv, max_q_hidden=max_q_hidden)


class TritonBackend(AttentionBackend):
    """Variable-length paged attention in Triton (GPU; on CPU only under `TRITON_INTERPRET=1`)."""

    name = "triton"

    def build_metadata(
        self, plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype
    ) -> AttentionMetadata:
        meta = build_metadata(plan, layout, chunk_tokens, dtype, paged=True)
        kv_q = [s.num_new for s in plan.seqs if s.cache_type is CacheType.KV]
        hidden_q = [s.num_new for s in plan.seqs if s.cache_type is not CacheType.KV]
        return triton_metadata(meta, max(kv_q, default=0), max(hidden_q, default=0))

    def forward(self, layer, workspace, meta, q, k, v, x, project_kv, scale):  # type: ignore[no-untyped-def]
        if q.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError(
                "the triton attention backend runs on CPU tensors only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before start (slow; meant for tests), or use cpu_paged"
            )
        if not isinstance(meta, TritonMetadata) or meta.paged is None:
            raise TypeError("metadata built for another backend")
        self._store(layer, meta, k, v, x)
        paged = meta.paged
        out = torch.empty_like(q)
        if paged.kv is not None:
            b = paged.kv
            paged_attention(out, q, layer.keys, layer.values, b.block_tables, b.q_start, b.q_len, b.kv_len,
                            meta.max_q_kv, scale, causal=True)
        if paged.hidden_new is not None:
            self._hidden(layer, workspace, meta, q, k, v, project_kv, scale, out)
        return out

    @staticmethod
    def _store(layer, meta, k, v, x) -> None:  # type: ignore[no-untyped-def]
        store_kv(k, v, layer.keys, layer.values, meta.kv_write_tokens, meta.kv_write_blocks, meta.kv_write_offsets)
        if meta.hidden_write_tokens.numel():
            assert layer.hidden is not None, "hidden rows planned for a model without a hidden cache"
            layer.hidden[meta.hidden_write_rows] = x[meta.hidden_write_tokens]

    @staticmethod
    def _hidden(layer, workspace, meta, q, k, v, project_kv, scale, out) -> None:  # type: ignore[no-untyped-def]
        # The new tokens over themselves (this step's K/V, one row per "block"), then each workspace
        # pass of recomputed history merged in place; float32 result and log-sum-exp throughout.
        paged = meta.paged
        n, heads, dim = q.shape
        acc = torch.empty(n, heads, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(n, heads, dtype=torch.float32, device=q.device)
        b = paged.hidden_new
        paged_attention(acc, q, k.unsqueeze(1), v.unsqueeze(1), b.block_tables, b.q_start, b.q_len, b.kv_len,
                        meta.max_q_hidden, scale, causal=True, lse=lse)
        for hidden_pass in paged.hidden_passes:
            kv = _recompute(layer, workspace, hidden_pass.rows, hidden_pass.positions, project_kv)
            p = hidden_pass.batch
            paged_attention(acc, q, kv[:, 0].unsqueeze(1), kv[:, 1].unsqueeze(1), p.block_tables, p.q_start,
                            p.q_len, p.kv_len, meta.max_q_hidden, scale, causal=False, lse=lse, accumulate=True)
        t = paged.hidden_tokens
        out[t] = acc[t].to(out.dtype)
