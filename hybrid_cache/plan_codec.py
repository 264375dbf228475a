"""A batch plan as two flat arrays, one of integers and one of floats: the compact form sent to every
rank once per step.

Why two arrays and not one per field: every array costs the channel a header entry, a copy and a
parse, and the rank a `tolist`; with ~30 fields that was most of the plan's trip (docs/BENCHMARKS.md,
issue 15). One pass over the sequences writes everything; one pass on the rank reads it back.
Only what workers read travels: token ids, positions, block tables, cache types, conversions and the
sampling fields the sampler reads (stop strings stay with the engine; stop token ids and `ignore_eos`
travel because `min_tokens` masks them). A step's sampling settings travel once per distinct value,
as a table the sequences index (a batch mostly shares a few). Every value `SamplingParams` accepts
survives a round trip unchanged: floats as float64 (exact for Python floats), top_k and seed as int64
(`SamplingParams` bounds both by 2**63 - 1 and refuses negative seeds, so -1 can mean "unseeded";
`logprobs` is at most 20, so -1 means "none").

Layout of `ints`: the counts (sequences, sampling rows, finished ids, block copies); each sampling row
(top_k, seed, min_tokens, logprobs, ignore_eos, #stop ids, #bias ids, the stop ids, the bias ids);
each sequence (`_SEQ_FIELDS` values, then its token ids, block table and conversion blocks); the
finished ids; the block copies as (src, dst) pairs. `floats` holds each sampling row's `_FLOATS`,
then its bias values.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from hybrid_cache.plan import (
    BatchPlan,
    CacheType,
    Conversion,
    SampledTokens,
    SamplingParams,
    SequencePlan,
    TokenLogprobs,
)

EncodedPlan = dict[str, np.ndarray]
UNSEEDED = -1
NO_LOGPROBS = -1
NOT_FORKED = -1
NO_CONVERSION = -1
_SAMPLING_CACHE_SIZE = 4096  # distinct sampling settings a rank remembers (an LRU: seeded requests each add one)
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
_TYPES = (CacheType.KV, CacheType.HIDDEN)
_TYPE_CODES = {kind: code for code, kind in enumerate(_TYPES)}
_COUNTS = 4  # sequences, sampling rows, finished ids, block copies
_ROW_FIELDS = 7  # top_k, seed, min_tokens, logprobs, ignore_eos, #stop ids, #bias ids
# seq_id, start_pos, cache type, sampling row, fork_of, prompt_logprobs, conversion tokens,
# #tokens, #blocks, #conversion hidden blocks, #conversion kv blocks
_SEQ_FIELDS = 11
SamplingRow = tuple[tuple[int, ...], tuple[float, ...]]
# The encoded row of each `SamplingParams` object the executor has sent, by identity: a request's
# object is the same every step, and rebuilding its row cost more than the rest of the sequence.
# Each entry holds its object, so an id cannot be reused while cached.
_ROWS: dict[int, tuple[SamplingParams, SamplingRow]] = {}


def _sampling_row(params: SamplingParams) -> SamplingRow:
    cached = _ROWS.get(id(params))
    if cached is not None and cached[0] is params:
        return cached[1]
    bias_ids = tuple(token for token, _ in params.logit_bias)
    row = (
        (params.top_k, UNSEEDED if params.seed is None else params.seed, params.min_tokens,
         NO_LOGPROBS if params.logprobs is None else params.logprobs, int(params.ignore_eos),
         len(params.stop_token_ids), len(bias_ids), *params.stop_token_ids, *bias_ids),
        (*(getattr(params, name) for name in _FLOATS), *(bias for _, bias in params.logit_bias)),
    )
    if len(_ROWS) >= _SAMPLING_CACHE_SIZE:
        _ROWS.clear()  # finished requests' objects: dropped all at once, rebuilt on demand
    _ROWS[id(params)] = (params, row)
    return row


def encode_plan(plan: BatchPlan) -> EncodedPlan:
    table: dict[SamplingRow, int] = {}  # each distinct sampling row, by value → its index
    seqs: list[int] = []
    for s in plan.seqs:
        row = table.setdefault(_sampling_row(s.sampling), len(table))
        c = s.conversion
        seqs += (
            s.seq_id, s.start_pos, _TYPE_CODES[s.cache_type], row, NOT_FORKED if s.fork_of is None else s.fork_of,
            NO_LOGPROBS if s.prompt_logprobs is None else s.prompt_logprobs,
            NO_CONVERSION if c is None else c.num_tokens, len(s.token_ids), len(s.block_table),
            0 if c is None else len(c.hidden_blocks), 0 if c is None else len(c.kv_blocks),
        )
        seqs += s.token_ids
        seqs += s.block_table
        if c is not None:
            seqs += c.hidden_blocks
            seqs += c.kv_blocks
    ints = [len(plan.seqs), len(table), len(plan.finished_seq_ids), len(plan.block_copies)]
    floats: list[float] = []
    for row_ints, row_floats in table:
        ints += row_ints
        floats += row_floats
    ints += seqs
    ints += plan.finished_seq_ids
    for src, dst in plan.block_copies:
        ints += (src, dst)
    return {"ints": np.array(ints, dtype=np.int64), "floats": np.array(floats, dtype=np.float64)}


def decode_plan(arrays: EncodedPlan) -> BatchPlan:
    """The plan `encode_plan` encoded; ValueError if the arrays do not hold exactly one."""
    v, f = arrays["ints"].tolist(), arrays["floats"].tolist()
    try:
        num_seqs, num_rows, num_finished, num_copies = v[:_COUNTS]
        at, float_at, samplings = _COUNTS, 0, []
        for _ in range(num_rows):
            top_k, seed, min_tokens, logprobs, ignore_eos, num_stop, num_bias = v[at : at + _ROW_FIELDS]
            at += _ROW_FIELDS
            stop_ids = tuple(v[at : at + num_stop])
            bias_ids = v[at + num_stop : at + num_stop + num_bias]
            at += num_stop + num_bias
            floats = tuple(f[float_at : float_at + len(_FLOATS)])
            float_at += len(_FLOATS)
            bias = tuple(zip(bias_ids, f[float_at : float_at + num_bias], strict=True))
            float_at += num_bias
            samplings.append(_sampling(top_k, seed, min_tokens, logprobs, bool(ignore_eos), stop_ids, bias, floats))
        seqs = []
        for _ in range(num_seqs):
            seq_id, start, kind, row, fork_of, prompt_k, conv_tokens, n_tokens, n_blocks, n_hidden, n_kv = v[
                at : at + _SEQ_FIELDS
            ]
            at += _SEQ_FIELDS
            tokens = v[at : at + n_tokens]
            blocks = v[at + n_tokens : at + n_tokens + n_blocks]
            at += n_tokens + n_blocks
            conversion = None
            if conv_tokens != NO_CONVERSION:
                conversion = Conversion(v[at : at + n_hidden], v[at + n_hidden : at + n_hidden + n_kv], conv_tokens)
            at += n_hidden + n_kv
            seqs.append(SequencePlan(
                seq_id, tokens, start, _TYPES[kind], blocks, samplings[row], conversion,
                None if fork_of == NOT_FORKED else fork_of, None if prompt_k == NO_LOGPROBS else prompt_k,
            ))
        finished = v[at : at + num_finished]
        at += num_finished
        copies = [(v[at + 2 * i], v[at + 2 * i + 1]) for i in range(num_copies)]
        at += 2 * num_copies
    except (ValueError, IndexError) as err:  # too few values for the counts they announce
        raise ValueError(f"a malformed plan: {err}") from err
    if at != len(v) or float_at != len(f):
        raise ValueError(f"a malformed plan: {len(v) - at} integers and {len(f) - float_at} floats left over")
    return BatchPlan(seqs, finished, copies)


@functools.lru_cache(maxsize=_SAMPLING_CACHE_SIZE)
def _sampling(top_k: int, seed: int, min_tokens: int, logprobs: int, ignore_eos: bool, stop_token_ids: tuple[int, ...],
              logit_bias: tuple[tuple[int, float], ...], floats: tuple[float, ...]) -> SamplingParams:
    """The `SamplingParams` these decoded values describe, built (and so validated) once per distinct value:
    a step's sequences mostly share them, and rebuilding each one every step cost ~35 µs a sequence on
    every rank. Sharing is safe: `SamplingParams` is frozen."""
    return SamplingParams(
        # max_tokens stays with the engine: the default here, or as large as min_tokens needs.
        max_tokens=max(SamplingParams.max_tokens, min_tokens), top_k=top_k, seed=None if seed == UNSEEDED else seed,
        min_tokens=min_tokens, logprobs=None if logprobs == NO_LOGPROBS else logprobs, ignore_eos=ignore_eos,
        stop_token_ids=stop_token_ids, logit_bias=logit_bias, **dict(zip(_FLOATS, floats)),
    )


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated values and `len(rows) + 1` offsets."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
    return values, offsets


def _encode_entries(prefix: str, entries: list[TokenLogprobs | None]) -> EncodedPlan:
    """Optional `TokenLogprobs` as flat arrays named `prefix`_...: which are given, and their fields."""
    given = [lp for lp in entries if lp is not None]
    top_ids, top_offsets = _ragged([[t for t, _ in lp.top] for lp in given])
    return {
        f"{prefix}_rows": np.array([i for i, lp in enumerate(entries) if lp is not None], dtype=np.int64),
        f"{prefix}_count": np.array([len(entries)], dtype=np.int64),
        f"{prefix}_token": np.array([lp.token_id for lp in given], dtype=np.int64),
        f"{prefix}_logprob": np.array([lp.logprob for lp in given], dtype=np.float64),
        f"{prefix}_rank": np.array([lp.rank for lp in given], dtype=np.int64),
        f"{prefix}_top_ids": top_ids, f"{prefix}_top_offsets": top_offsets,
        f"{prefix}_top_logprobs": np.array([v for lp in given for _, v in lp.top], dtype=np.float64),
    }


def _decode_entries(prefix: str, arrays: EncodedPlan) -> list[TokenLogprobs | None]:
    entries: list[TokenLogprobs | None] = [None] * int(arrays[f"{prefix}_count"][0])
    ids, values = arrays[f"{prefix}_top_ids"].tolist(), arrays[f"{prefix}_top_logprobs"].tolist()
    offsets = arrays[f"{prefix}_top_offsets"].tolist()
    columns = (arrays[f"{prefix}_{k}"].tolist() for k in ("rows", "token", "logprob", "rank"))
    for j, (row, token, logprob, rank) in enumerate(zip(*columns)):
        top = tuple(zip(ids[offsets[j] : offsets[j + 1]], values[offsets[j] : offsets[j + 1]]))
        entries[row] = TokenLogprobs(token, logprob, rank, top)
    return entries


def encode_sampled(tokens: list[int]) -> EncodedPlan:
    """A step's answer as flat arrays: the token ids, and the logprobs and prompt logprobs a
    `SampledTokens` carries (`decode_sampled` restores them; a plain list comes back as a
    `SampledTokens` without any)."""
    arrays = {"tokens": np.asarray(tokens, dtype=np.int64)}
    if not isinstance(tokens, SampledTokens):
        return arrays
    if tokens.logprobs is not None:
        arrays |= _encode_entries("logprobs", tokens.logprobs)
    if tokens.prompt_logprobs is not None:
        per_seq = tokens.prompt_logprobs
        lengths = np.array([-1 if lps is None else len(lps) for lps in per_seq], dtype=np.int64)
        arrays |= _encode_entries("prompt", [lp for lps in per_seq if lps is not None for lp in lps])
        arrays["prompt_lengths"] = lengths
    return arrays


def decode_sampled(arrays: EncodedPlan) -> SampledTokens:
    tokens = arrays["tokens"].tolist()
    logprobs = _decode_entries("logprobs", arrays) if "logprobs_rows" in arrays else None
    prompt: list[list[TokenLogprobs | None] | None] | None = None
    if "prompt_lengths" in arrays:
        flat, at, prompt = _decode_entries("prompt", arrays), 0, []
        for length in arrays["prompt_lengths"].tolist():
            prompt.append(None if length < 0 else flat[at : at + length])
            at += max(length, 0)
    return SampledTokens(tokens, logprobs, prompt)


_TIMING_NAMES, _TIMING_SECONDS = "timing_names", "timing_seconds"  # a rank's timings in its answer


def encode_timings(totals: dict[str, float]) -> EncodedPlan:
    """A rank's cumulative timings (`ModelRunner.timings`) as two arrays (the names as comma-separated
    UTF-8, the seconds), to ride along with its answer: the executor then knows them after every step
    without asking the rank. Two arrays, not one per name: each array costs the channel per step."""
    return {_TIMING_NAMES: _timing_names(tuple(totals)),
            _TIMING_SECONDS: np.fromiter(totals.values(), dtype=np.float64, count=len(totals))}


@functools.lru_cache(maxsize=16)
def _timing_names(names: tuple[str, ...]) -> np.ndarray:
    if any("," in name for name in names):
        raise ValueError(f"a timing name holds a comma: {names}")
    return np.frombuffer(",".join(names).encode(), dtype=np.uint8)


def decode_timings(arrays: EncodedPlan) -> dict[str, float]:
    """The timings `encode_timings` encoded ({} when the answer carries none)."""
    if _TIMING_NAMES not in arrays:
        return {}
    text = arrays[_TIMING_NAMES].tobytes().decode()
    return dict(zip(text.split(",") if text else [], arrays[_TIMING_SECONDS].tolist(), strict=True))
