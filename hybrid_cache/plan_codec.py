"""A batch plan as a few flat integer/float arrays: the compact form sent to every rank once per step.

Lists of Python objects cost a pickle per field per request; these arrays cost one buffer each.
Only what workers read travels: token ids, positions, block tables, cache types, conversions and the
sampling fields the sampler reads (stop strings stay with the engine; stop token ids and `ignore_eos`
travel because `min_tokens` masks them). Every value `SamplingParams` accepts survives a round trip
unchanged: floats as float64 (exact for Python floats), top_k and seed as int64 (`SamplingParams`
bounds both by 2**63 - 1 and refuses negative seeds, so -1 can mean "unseeded"; `logprobs` is at most
20, so -1 means "none").
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
_SAMPLING_CACHE_SIZE = 4096  # distinct sampling settings a rank remembers (an LRU: seeded requests each add one)
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
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
    params = [s.sampling for s in seqs]
    stop_ids, stop_offsets = _ragged([p.stop_token_ids for p in params])
    bias_ids, bias_offsets = _ragged([[token for token, _ in p.logit_bias] for p in params])
    biases = [bias for p in params for _, bias in p.logit_bias]
    return {
        "seq_id": np.array([s.seq_id for s in seqs], dtype=np.int64),
        "start_pos": np.array([s.start_pos for s in seqs], dtype=np.int64),
        "cache_type": np.array([_TYPES.index(s.cache_type) for s in seqs], dtype=np.int8),
        "tokens": tokens, "token_offsets": token_offsets,
        "blocks": blocks, "block_offsets": block_offsets,
        "conversion_tokens": np.array([c.num_tokens if c else -1 for c in conversions], dtype=np.int64),
        "conversion_hidden": hidden, "conversion_hidden_offsets": hidden_offsets,
        "conversion_kv": kv, "conversion_kv_offsets": kv_offsets,
        **{name: np.array([getattr(p, name) for p in params], dtype=np.float64) for name in _FLOATS},
        "top_k": np.array([p.top_k for p in params], dtype=np.int64),
        "seed": np.array([UNSEEDED if p.seed is None else p.seed for p in params], dtype=np.int64),
        "min_tokens": np.array([p.min_tokens for p in params], dtype=np.int64),
        "logprobs": np.array([NO_LOGPROBS if p.logprobs is None else p.logprobs for p in params], dtype=np.int64),
        "ignore_eos": np.array([p.ignore_eos for p in params], dtype=np.bool_),
        "stop_token_ids": stop_ids, "stop_token_offsets": stop_offsets,
        "logit_bias_ids": bias_ids, "logit_bias_offsets": bias_offsets,
        "logit_bias": np.array(biases, dtype=np.float64),
        "finished_seq_ids": np.array(plan.finished_seq_ids, dtype=np.int64),
        "fork_of": np.array([NOT_FORKED if s.fork_of is None else s.fork_of for s in seqs], dtype=np.int64),
        "prompt_logprobs": np.array([NO_LOGPROBS if s.prompt_logprobs is None else s.prompt_logprobs for s in seqs],
                                    dtype=np.int64),
        "block_copies": np.array(plan.block_copies, dtype=np.int64).reshape(-1, 2),
    }


def decode_plan(arrays: EncodedPlan) -> BatchPlan:
    def rows(values: str, offsets: str) -> list[list[int]]:
        v, o = arrays[values].tolist(), arrays[offsets].tolist()
        return [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    tokens, blocks = rows("tokens", "token_offsets"), rows("blocks", "block_offsets")
    hidden, kv = rows("conversion_hidden", "conversion_hidden_offsets"), rows("conversion_kv", "conversion_kv_offsets")
    stop_ids, bias_ids = rows("stop_token_ids", "stop_token_offsets"), rows("logit_bias_ids", "logit_bias_offsets")
    biases, bias_offsets = arrays["logit_bias"].tolist(), arrays["logit_bias_offsets"].tolist()
    bias_values = [biases[bias_offsets[i] : bias_offsets[i + 1]] for i in range(len(bias_offsets) - 1)]
    floats = list(zip(*(arrays[k].tolist() for k in _FLOATS)))
    forks, prompt_k = arrays["fork_of"].tolist(), arrays["prompt_logprobs"].tolist()
    seqs = []
    for i, (seq_id, start, kind, conv_tokens, top_k, seed, min_tokens, logprobs, ignore_eos) in enumerate(
        zip(*(arrays[k].tolist() for k in ("seq_id", "start_pos", "cache_type", "conversion_tokens", "top_k",
                                            "seed", "min_tokens", "logprobs", "ignore_eos")))
    ):
        sampling = _sampling(top_k, seed, min_tokens, logprobs, ignore_eos, tuple(stop_ids[i]),
                             tuple(zip(bias_ids[i], bias_values[i])), floats[i])
        conversion = Conversion(hidden[i], kv[i], conv_tokens) if conv_tokens >= 0 else None
        fork_of = None if forks[i] == NOT_FORKED else forks[i]
        prompt_logprobs = None if prompt_k[i] == NO_LOGPROBS else prompt_k[i]
        seqs.append(SequencePlan(seq_id, tokens[i], start, _TYPES[kind], blocks[i], sampling, conversion, fork_of,
                                 prompt_logprobs))
    copies = [(src, dst) for src, dst in arrays["block_copies"].tolist()]
    return BatchPlan(seqs, arrays["finished_seq_ids"].tolist(), copies)


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
