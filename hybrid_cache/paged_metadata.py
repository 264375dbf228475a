"""Step metadata of the paged backends (`cpu_paged`, `triton`), built in NumPy over persistent buffers.

A step's paged-attention batch — block tables, where each sequence's queries start, how many there
are, how many keys each sees, and the cache slot of every new token — lives in one persistent int32
host buffer (`StepBuffers`) that is updated, not rebuilt: a block-table row is rewritten only when its
sequence or its block list changed since the previous step, which in steady decoding is once every
`block_size` tokens per sequence. Everything else is a handful of vectorized NumPy operations (far
cheaper per call than small torch operations); no Python loop runs per token.
"""

from __future__ import annotations

import numpy as np
import torch

from hybrid_cache.layout import CacheLayout
from hybrid_cache.metadata import (
    AttentionMetadata,
    ConversionChunk,
    PagedBatch,
    PagedMetadata,
    _consecutive,
    _conversion_chunks,
    _hidden_passes,
    _int32,
)
from hybrid_cache.plan import BatchPlan, CacheType


class StepBuffers:
    """Persistent int32 arrays of a step's paged batch, kept from one step to the next.

    One flat buffer, in this order: block tables `[rows, width]` (a fixed row stride, so a row written
    in an earlier step stays valid), `q_start`, `q_len`, `kv_len` (`rows` each) and the K/V slot of
    each token (`tokens`). Being one contiguous buffer, a device copy of it is one transfer. The
    capacities grow (doubling) when a step needs more; a regrowth rewrites every row once. The views a
    step gets are valid until the next step is built.
    """

    def __init__(self) -> None:
        self.rows = self.width = self.tokens = 0
        self.flat = np.zeros(0, dtype=np.int32)
        self.host = torch.from_numpy(self.flat)
        self._written: list[list[int] | None] = []  # the block list each table row holds
        self.rows_rewritten = 0  # table rows written by the last `fill` (a test checks it stays small)

    def _reserve(self, rows: int, width: int, tokens: int) -> None:
        if rows <= self.rows and width <= self.width and tokens <= self.tokens:
            return
        self.rows, self.width = max(rows, 2 * self.rows), max(width, 2 * self.width)
        self.tokens = max(tokens, 2 * self.tokens)
        self.flat = np.zeros(self.rows * self.width + 3 * self.rows + self.tokens, dtype=np.int32)
        self.host = torch.from_numpy(self.flat)
        self._written = [None] * self.rows

    def fill(self, tables: list[list[int]], tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray]:
        """Write `tables` (rows that changed only); return the views (tables, q_start, q_len, kv_len, slots)."""
        batch = len(tables)
        self._reserve(batch, max(1, max(len(t) for t in tables)), tokens)
        grid = self.flat[: self.rows * self.width].reshape(self.rows, self.width)
        written, rewritten = self._written, 0
        for i, table in enumerate(tables):
            if written[i] != table:  # a C-level list comparison: no Python loop over blocks
                grid[i, : len(table)] = table
                written[i] = list(table)
                rewritten += 1
        self.rows_rewritten = rewritten
        base = self.rows * self.width
        q_start = self.flat[base : base + batch]
        q_len = self.flat[base + self.rows : base + self.rows + batch]
        kv_len = self.flat[base + 2 * self.rows : base + 2 * self.rows + batch]
        slots = self.flat[base + 3 * self.rows : base + 3 * self.rows + tokens]
        return grid[:batch], q_start, q_len, kv_len, slots


def build_paged(
    plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, buffers: StepBuffers | None = None
) -> AttentionMetadata:
    """The paged backends' metadata for `plan`; with `buffers`, its paged batch and slots are views of them.

    All sequences share one paged batch (`meta.paged.kv`) in plan order; a hidden request's row has
    `q_len = 0`, so the KV call does no work for it (its tokens have slot -1: nothing is stored for them
    in K/V). Without `buffers` the arrays are fresh (tests, one-off calls).
    """
    buffers = buffers if buffers is not None else StepBuffers()
    seqs = plan.seqs
    count = len(seqs)
    kv_tpb = layout.block_size
    hidden_tpb = layout.tokens_per_block(CacheType.HIDDEN) if layout.hidden_allowed else 1
    num_new = np.fromiter((s.num_new for s in seqs), dtype=np.int64, count=count)
    start = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=count)
    is_kv = np.fromiter((s.cache_type is CacheType.KV for s in seqs), dtype=bool, count=count)
    ends = np.cumsum(num_new)
    begins = ends - num_new
    total = int(ends[-1])
    tables, q_start, q_len, kv_len, slots = buffers.fill([s.block_table for s in seqs], total)
    q_start[:] = begins
    q_len[:] = np.where(is_kv, num_new, 0)
    kv_len[:] = np.where(is_kv, start + num_new, 0)

    seq_of_token = np.repeat(np.arange(count), num_new)
    positions = np.arange(total) - begins[seq_of_token] + start[seq_of_token]
    token_kv = is_kv[seq_of_token]
    tpb = np.where(token_kv, kv_tpb, hidden_tpb)
    block = tables[seq_of_token, positions // tpb].astype(np.int64)
    offsets = positions % tpb
    slots[:] = np.where(token_kv, block * kv_tpb + offsets, -1)
    kv_tok = np.flatnonzero(token_kv)
    hid_tok = np.flatnonzero(~token_kv)

    kv_batch = None
    if is_kv.any():
        t = torch.from_numpy
        kv_batch = PagedBatch(t(tables), t(q_start), t(q_len), t(kv_len))
    paged = PagedMetadata(kv_batch, None, torch.from_numpy(hid_tok), [], slots=torch.from_numpy(slots))
    conversions: list[ConversionChunk] = []
    for seq in seqs:
        if seq.conversion is not None:
            conversions.extend(_conversion_chunks(seq, layout, chunk_tokens))
    if len(hid_tok):
        hid_index = np.flatnonzero(~is_kv)
        hid_seq = [seqs[i] for i in hid_index]
        hid_start, hid_len = begins[hid_index].tolist(), num_new[hid_index].tolist()
        paged.hidden_new = PagedBatch(_consecutive(hid_start, hid_len), _int32(hid_start), _int32(hid_len),
                                      _int32(hid_len))
        paged.hidden_passes = _hidden_passes(hid_seq, hid_start, layout, chunk_tokens)
    return AttentionMetadata(
        positions=torch.from_numpy(positions),
        kv_write_tokens=torch.from_numpy(kv_tok),
        kv_write_blocks=torch.from_numpy(block[kv_tok]),
        kv_write_offsets=torch.from_numpy(offsets[kv_tok]),
        hidden_write_tokens=torch.from_numpy(hid_tok),
        hidden_write_rows=torch.from_numpy(block[hid_tok] * hidden_tpb + offsets[hid_tok]),
        logits_index=torch.from_numpy(ends - 1),
        conversions=conversions,
        paged=paged,
    )
