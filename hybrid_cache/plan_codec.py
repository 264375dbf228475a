"""A batch plan as a few flat integer/float arrays: the compact form sent to every rank once per step.

Lists of Python objects cost a pickle per field per request; these arrays cost one buffer each.
Only what workers read travels: token ids, positions, block tables, cache types, conversions and the
sampling fields (stop conditions stay with the engine). Every value `SamplingParams` accepts survives a
round trip unchanged: temperature and top_p as float64 (exact for Python floats), top_k and seed as
int64 (`SamplingParams` bounds both by 2**63 - 1 and refuses negative seeds, so -1 can mean "unseeded").
"""

from __future__ import annotations

import itertools

import numpy as np

from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan

EncodedPlan = dict[str, np.ndarray]
UNSEEDED = -1
_TYPES = (CacheType.KV, CacheType.HIDDEN)


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated values and `len(rows) + 1` offsets."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
    return values, offsets


def encode_plan(plan: BatchPlan) -> EncodedPlan:
    seqs = plan.seqs
    conversions = [s.conversion for s in seqs]
    tokens, token_offsets = _ragged([s.token_ids for s in seqs])
    blocks, block_offsets = _ragged([s.block_table for s in seqs])
    hidden, hidden_offsets = _ragged([c.hidden_blocks if c else [] for c in conversions])
    kv, kv_offsets = _ragged([c.kv_blocks if c else [] for c in conversions])
    return {
        "seq_id": np.array([s.seq_id for s in seqs], dtype=np.int64),
        "start_pos": np.array([s.start_pos for s in seqs], dtype=np.int64),
        "cache_type": np.array([_TYPES.index(s.cache_type) for s in seqs], dtype=np.int8),
        "tokens": tokens, "token_offsets": token_offsets,
        "blocks": blocks, "block_offsets": block_offsets,
        "conversion_tokens": np.array([c.num_tokens if c else -1 for c in conversions], dtype=np.int64),
        "conversion_hidden": hidden, "conversion_hidden_offsets": hidden_offsets,
        "conversion_kv": kv, "conversion_kv_offsets": kv_offsets,
        "temperature": np.array([s.sampling.temperature for s in seqs], dtype=np.float64),
        "top_p": np.array([s.sampling.top_p for s in seqs], dtype=np.float64),
        "top_k": np.array([s.sampling.top_k for s in seqs], dtype=np.int64),
        "seed": np.array([UNSEEDED if s.sampling.seed is None else s.sampling.seed for s in seqs], dtype=np.int64),
        "finished_seq_ids": np.array(plan.finished_seq_ids, dtype=np.int64),
    }


def decode_plan(arrays: EncodedPlan) -> BatchPlan:
    def rows(values: str, offsets: str) -> list[list[int]]:
        v, o = arrays[values].tolist(), arrays[offsets].tolist()
        return [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    tokens, blocks = rows("tokens", "token_offsets"), rows("blocks", "block_offsets")
    hidden, kv = rows("conversion_hidden", "conversion_hidden_offsets"), rows("conversion_kv", "conversion_kv_offsets")
    seqs = []
    for i, (seq_id, start, kind, conv_tokens, temperature, top_p, top_k, seed) in enumerate(
        zip(*(arrays[k].tolist() for k in
              ("seq_id", "start_pos", "cache_type", "conversion_tokens", "temperature", "top_p", "top_k", "seed")))
    ):
        sampling = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=None if seed == UNSEEDED else seed
        )
        conversion = Conversion(hidden[i], kv[i], conv_tokens) if conv_tokens >= 0 else None
        seqs.append(SequencePlan(seq_id, tokens[i], start, _TYPES[kind], blocks[i], sampling, conversion))
    return BatchPlan(seqs, arrays["finished_seq_ids"].tolist())
