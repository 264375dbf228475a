"""Index tensors for one step, built once from the batch plan and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import BatchPlan, CacheType, SequencePlan


def block_offsets(
    block_table: list[int], start: int, end: int, tokens_per_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset in block) of positions `start..end-1` in a block table."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(block_table, dtype=torch.long)[positions // tokens_per_block]
    return blocks, positions % tokens_per_block


def rows_for(block_table: list[int], start: int, end: int, tokens_per_block: int) -> torch.Tensor:
    """Flat hidden-row indices of positions `start..end-1` in a block table."""
    blocks, offsets = block_offsets(block_table, start, end, tokens_per_block)
    return blocks * tokens_per_block + offsets


def padded_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one `[B, max blocks]` tensor, padded with block 0 (masked out by the caller)."""
    out = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
    for i, table in enumerate(tables):
        out[i, : len(table)] = torch.tensor(table, dtype=torch.long)
    return out


@dataclass
class KVDecodeGroup:
    """KV requests with one new token each, attended in one padded call."""

    token_index: torch.Tensor  # [B] rows of the step's token batch
    block_tables: torch.Tensor  # [B, max blocks], padded with block 0
    mask: torch.Tensor | None  # [B, 1, 1, max blocks * block_size] additive (0 or -inf); None if unpadded


@dataclass
class Span:
    """A request handled on its own: tokens `begin..end` of the step, first at position `start_pos`."""

    begin: int
    end: int
    start_pos: int
    context_blocks: torch.Tensor | None = None  # KV requests with history: blocks holding positions 0..end


@dataclass
class HistoryChunk:
    """At most `chunk_tokens` rows of hidden history, recomputed together.

    `pieces` maps row ranges of the chunk to the hidden span (index into `hidden_spans`) they belong to.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    pieces: list[tuple[int, int, int]]


@dataclass
class ConversionChunk:
    """Rows of a hidden→KV conversion: read x from `rows`, write K/V at (`kv_blocks`, `kv_offsets`)."""

    rows: torch.Tensor
    kv_blocks: torch.Tensor
    kv_offsets: torch.Tensor
    positions: torch.Tensor


@dataclass
class PagedBatch:
    """Sequences for one paged-attention call: queries `q_start..q_start+q_len` (rows of the step)
    attend over `kv_len` keys, key `j` at `block_tables[s, j // block_size]`, offset `j % block_size`."""

    block_tables: torch.Tensor  # int32 [B, width]
    q_start: torch.Tensor  # int32 [B]
    q_len: torch.Tensor  # int32 [B]
    kv_len: torch.Tensor  # int32 [B]


@dataclass
class HiddenPass:
    """History rows recomputed together into the workspace (`rows` of the hidden cache, at `positions`)
    and the call that attends over them (tables index workspace rows); `tokens`: the step rows it covers."""

    rows: torch.Tensor
    positions: torch.Tensor
    batch: PagedBatch
    tokens: torch.Tensor


@dataclass
class PagedMetadata:
    """What the `cpu_paged` backend needs: one call for all KV requests, one for hidden requests' new
    tokens (over this step's K/V), one per workspace pass of hidden history."""

    kv: PagedBatch | None
    hidden_new: PagedBatch | None
    hidden_tokens: torch.Tensor  # step rows of hidden requests
    hidden_passes: list[HiddenPass]
    slots: torch.Tensor | None = None  # int32 [T]: K/V slot (block * block_size + offset) per token, -1: none


@dataclass
class AttentionMetadata:
    positions: torch.Tensor
    kv_write_tokens: torch.Tensor
    kv_write_blocks: torch.Tensor
    kv_write_offsets: torch.Tensor
    hidden_write_tokens: torch.Tensor
    hidden_write_rows: torch.Tensor
    logits_index: torch.Tensor  # last token of each request, in plan order
    kv_decode: KVDecodeGroup | None = None
    kv_spans: list[Span] = field(default_factory=list)
    hidden_spans: list[Span] = field(default_factory=list)
    hidden_history: list[HistoryChunk] = field(default_factory=list)
    conversions: list[ConversionChunk] = field(default_factory=list)
    paged: PagedMetadata | None = None  # set for the cpu_paged backend instead of the groups above

    def to(self, device: torch.device) -> AttentionMetadata:
        """Move every index tensor to `device` (a no-op on CPU)."""
        if device.type == "cpu":
            return self

        def move(value: object) -> object:
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=True)
            if isinstance(value, list):
                return [move(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return type(value)(**{k: move(getattr(value, k)) for k in value.__dataclass_fields__})
            return value

        return move(self)  # type: ignore[return-value]


def _history_chunks(
    rows: list[torch.Tensor], positions: list[torch.Tensor], chunk_tokens: int
) -> list[HistoryChunk]:
    """Pack each hidden span's history rows, in span order, into chunks of at most `chunk_tokens` rows."""
    chunks: list[HistoryChunk] = []
    chunk_rows: list[torch.Tensor] = []
    chunk_positions: list[torch.Tensor] = []
    pieces: list[tuple[int, int, int]] = []
    used = 0
    for span_index, (span_rows, span_positions) in enumerate(zip(rows, positions)):
        begin = 0
        while begin < len(span_rows):
            take = min(len(span_rows) - begin, chunk_tokens - used)
            chunk_rows.append(span_rows[begin : begin + take])
            chunk_positions.append(span_positions[begin : begin + take])
            pieces.append((span_index, used, used + take))
            begin, used = begin + take, used + take
            if used == chunk_tokens:
                chunks.append(HistoryChunk(torch.cat(chunk_rows), torch.cat(chunk_positions), pieces))
                chunk_rows, chunk_positions, pieces, used = [], [], [], 0
    if used:
        chunks.append(HistoryChunk(torch.cat(chunk_rows), torch.cat(chunk_positions), pieces))
    return chunks


def _int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one int32 `[B, max blocks]` tensor (entries past a table's end are never read)."""
    width = max(1, max(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def _consecutive(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """int32 tables addressing rows `start..start+length` (one row per block of size 1)."""
    width = max(1, max(lengths))
    return (torch.tensor(starts, dtype=torch.int32).unsqueeze(1) + torch.arange(width, dtype=torch.int32)).contiguous()


def _conversion_chunks(seq: SequencePlan, layout: CacheLayout, chunk_tokens: int) -> list[ConversionChunk]:
    conv = seq.conversion
    assert conv is not None
    hidden_tpb = layout.tokens_per_block(CacheType.HIDDEN)
    chunks = []
    for start in range(0, conv.num_tokens, chunk_tokens):
        stop = min(conv.num_tokens, start + chunk_tokens)
        blocks, offsets = block_offsets(conv.kv_blocks, start, stop, layout.block_size)
        rows = rows_for(conv.hidden_blocks, start, stop, hidden_tpb)
        chunks.append(ConversionChunk(rows, blocks, offsets, torch.arange(start, stop)))
    return chunks


def _hidden_passes(
    seqs: list[SequencePlan], starts: list[int], layout: CacheLayout, chunk_tokens: int
) -> list[HiddenPass]:
    """Pack the hidden requests' histories, in order, into passes of at most `chunk_tokens` rows; a
    history longer than what is left of a pass continues in the next one (merged by log-sum-exp)."""
    tpb = layout.tokens_per_block(CacheType.HIDDEN)
    passes: list[HiddenPass] = []
    pieces: list[tuple[int, int, int]] = []  # (request, first history position, end)
    used = 0

    tables = _tables([seq.block_table for seq in seqs]).long()
    all_starts = torch.tensor(starts, dtype=torch.int32)
    all_new = torch.tensor([seq.num_new for seq in seqs], dtype=torch.int32)

    def close() -> None:
        nonlocal pieces, used
        index = torch.tensor([i for i, _, _ in pieces])
        first = torch.tensor([a for _, a, _ in pieces])
        lengths = torch.tensor([b - a for _, a, b in pieces])
        owner = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
        bases = lengths.cumsum(0) - lengths
        positions = torch.arange(int(lengths.sum())) - bases[owner] + first[owner]
        seq = index[owner]
        rows = tables[seq, positions // tpb] * tpb + positions % tpb
        q_start, q_len = all_starts[index], all_new[index]
        batch = PagedBatch(_consecutive(bases.tolist(), lengths.tolist()), q_start, q_len, lengths.int())
        tokens = torch.repeat_interleave(q_start.long(), q_len.long()) + (
            torch.arange(int(q_len.sum())) - torch.repeat_interleave((q_len.cumsum(0) - q_len).long(), q_len.long())
        )
        passes.append(HiddenPass(rows, positions, batch, tokens))
        pieces, used = [], 0

    for i, seq in enumerate(seqs):
        begin = 0
        while begin < seq.start_pos:
            take = min(seq.start_pos - begin, chunk_tokens - used)
            pieces.append((i, begin, begin + take))
            begin, used = begin + take, used + take
            if used == chunk_tokens:
                close()
    if pieces:
        close()
    return passes


def build_metadata(
    plan: BatchPlan, layout: CacheLayout, chunk_tokens: int, dtype: torch.dtype = torch.float32, paged: bool = False
) -> AttentionMetadata:
    """Turn a batch plan into the index tensors the attention and recompute ops use (on CPU).

    `paged`: the `cpu_paged` backend's metadata (`meta.paged`) instead of the torch backend's groups.
    """
    if paged:
        from hybrid_cache.paged_metadata import build_paged  # it builds on this module's dataclasses

        return build_paged(plan, layout, chunk_tokens)
    kv_tpb = layout.block_size
    hidden_tpb = layout.tokens_per_block(CacheType.HIDDEN) if layout.hidden_allowed else 0
    positions, kv_tok, kv_blocks, kv_offsets, hid_tok, hid_rows, last = [], [], [], [], [], [], []
    decode_tokens, decode_tables, decode_lengths = [], [], []
    kv_spans: list[Span] = []
    hidden_spans: list[Span] = []
    history_rows: list[torch.Tensor] = []
    history_pos: list[torch.Tensor] = []
    conversions: list[ConversionChunk] = []

    offset = 0
    for seq in plan.seqs:
        begin, end = offset, offset + seq.num_new
        offset = end
        positions.append(torch.arange(seq.start_pos, seq.context_len))
        last.append(end - 1)
        token_index = torch.arange(begin, end)
        if seq.conversion is not None:
            conv = seq.conversion
            for start in range(0, conv.num_tokens, chunk_tokens):
                stop = min(conv.num_tokens, start + chunk_tokens)
                blocks, offsets = block_offsets(conv.kv_blocks, start, stop, kv_tpb)
                rows = rows_for(conv.hidden_blocks, start, stop, hidden_tpb)
                conversions.append(ConversionChunk(rows, blocks, offsets, torch.arange(start, stop)))
        if seq.cache_type is CacheType.KV:
            kv_tok.append(token_index)
            blocks, offsets = block_offsets(seq.block_table, seq.start_pos, seq.context_len, kv_tpb)
            kv_blocks.append(blocks)
            kv_offsets.append(offsets)
            used = seq.block_table[: -(-seq.context_len // kv_tpb)]
            if seq.num_new == 1:
                decode_tokens.append(begin)
                decode_tables.append(used)
                decode_lengths.append(seq.context_len)
            else:
                context = torch.tensor(used, dtype=torch.long) if seq.start_pos else None
                kv_spans.append(Span(begin, end, seq.start_pos, context))
        else:
            hid_tok.append(token_index)
            hid_rows.append(rows_for(seq.block_table, seq.start_pos, seq.context_len, hidden_tpb))
            hidden_spans.append(Span(begin, end, seq.start_pos))
            history_rows.append(rows_for(seq.block_table, 0, seq.start_pos, hidden_tpb))
            history_pos.append(torch.arange(seq.start_pos))

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    meta = AttentionMetadata(
        positions=cat(positions),
        kv_write_tokens=cat(kv_tok),
        kv_write_blocks=cat(kv_blocks),
        kv_write_offsets=cat(kv_offsets),
        hidden_write_tokens=cat(hid_tok),
        hidden_write_rows=cat(hid_rows),
        logits_index=torch.tensor(last, dtype=torch.long),
        kv_spans=kv_spans,
        hidden_spans=hidden_spans,
        conversions=conversions,
    )
    if decode_tokens:
        tables = padded_tables(decode_tables)
        width = tables.shape[1] * kv_tpb
        lengths = torch.tensor(decode_lengths)
        padding = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)
        # An additive float mask, built once per step: a boolean one is converted again in every layer.
        additive = None
        if bool(padding.any()):
            additive = torch.zeros(padding.shape, dtype=dtype).masked_fill_(padding, float("-inf"))[:, None, None, :]
        meta.kv_decode = KVDecodeGroup(torch.tensor(decode_tokens), tables, additive)

    meta.hidden_history = _history_chunks(history_rows, history_pos, chunk_tokens)
    return meta
