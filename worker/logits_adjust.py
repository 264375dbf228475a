"""What a request's sampling fields do to its logits before the choice: penalties, bias, `min_tokens`.

All rows of a step that need it are adjusted together: the per-row values become a few index tensors
(built in one pass over those rows' token histories) and each adjustment is one tensor operation, so
a batch costs the same few operations whatever it holds. Meanings follow vLLM and transformers:

- repetition penalty (transformers' `RepetitionPenaltyLogitsProcessor`): the logit of every token of
  the prompt or the output is divided by the penalty when positive, multiplied by it when negative;
- frequency and presence penalties (OpenAI's): `logit -= frequency * count + presence * (count > 0)`,
  counting the output's tokens only;
- logit bias: added to the token's logit;
- `min_tokens` (transformers' `MinNewTokensLengthLogitsProcessor`): while the output is shorter, EOS
  (unless `ignore_eos`) and the stop token ids get -inf.

vLLM's order: `min_tokens`, bias, then the penalties.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_cache.plan import SamplingParams


def adjust_logits(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    params: Sequence[SamplingParams],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """`logits` `[B, vocab]` (float) adjusted, row i for a sequence whose tokens so far are
    `histories[i]`, the first `prompt_lens[i]` of them its prompt."""
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.clone()

    # min_tokens: the tokens that would stop the request, masked while the output is short.
    masked_rows: list[int] = []
    masked_tokens: list[int] = []
    for i, p in enumerate(params):
        if p.min_tokens and len(histories[i]) - prompt_lens[i] < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            masked_rows += [i] * len(stops)
            masked_tokens += stops
    if masked_rows:
        logits[_index(masked_rows, device), _index(masked_tokens, device)] = float("-inf")

    bias = [(i, token, value) for i, p in enumerate(params) for token, value in p.logit_bias if token < vocab]
    if bias:
        bias_rows, bias_tokens, values = zip(*bias)
        logits.index_put_((_index(bias_rows, device), _index(bias_tokens, device)),
                          torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)

    # Penalties touch only the tokens each row has seen: gathered, changed and written back (a token
    # seen twice is written twice with the same value), never a pass over the whole vocabulary.
    repetition = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repetition:
        seen_rows, seen_tokens = _flat(repetition, [histories[i] for i in repetition], device)
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=device)[seen_rows]
        values = logits[seen_rows, seen_tokens]
        logits[seen_rows, seen_tokens] = torch.where(values > 0, values / penalty, values * penalty)

    counted = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    out_rows, out_tokens = _flat(counted, [histories[i][prompt_lens[i]:] for i in counted], device)
    if out_rows.numel():
        keys, counts = torch.unique(out_rows * vocab + out_tokens, return_counts=True)
        rows_u, tokens_u = keys // vocab, keys % vocab
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=device)
        presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=device)
        logits[rows_u, tokens_u] -= frequency[rows_u] * counts.to(logits.dtype) + presence[rows_u]
    return logits


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _flat(rows: list[int], tokens: list[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token of each row: one conversion per row, no loop per token."""
    if not rows:
        return _index([], device), _index([], device)
    lengths = _index([len(t) for t in tokens], device)
    flat = torch.cat([_index(t, device) for t in tokens])
    return torch.repeat_interleave(_index(rows, device), lengths), flat
