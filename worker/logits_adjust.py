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

    repetition = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repetition:
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        seen_rows = [i for i in repetition for _ in histories[i]]
        seen_tokens = [t for i in repetition for t in histories[i]]
        seen[_index(seen_rows, device), _index(seen_tokens, device)] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)

    counted = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if counted:
        count_rows = [i for i in counted for _ in range(len(histories[i]) - prompt_lens[i])]
        count_tokens = [t for i in counted for t in histories[i][prompt_lens[i]:]]
        counts = torch.zeros(rows, vocab, dtype=logits.dtype, device=device)
        if count_rows:
            counts.index_put_((_index(count_rows, device), _index(count_tokens, device)),
                              torch.ones(len(count_rows), dtype=logits.dtype, device=device), accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
