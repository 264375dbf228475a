"""Prompt logprobs: each prompt token's log probability given the tokens before it (`echo` with
`logprobs`), from the logits at every position of the prompt's chunks.

Position p's logits score token p + 1. Within a chunk that is the next token of the chunk; the last
position scores the first token of the next chunk, so its log-softmax waits for that chunk (one row
per sequence). The first token of a prompt has no logprob (None), as in vLLM and OpenAI.
"""

from __future__ import annotations

import torch

from hybrid_cache.plan import BatchPlan, TokenLogprobs


def prompt_rows(plan: BatchPlan) -> list[int]:
    """Where the tokens of the sequences asking for prompt logprobs sit in the step's token batch
    (sequences in plan order, each one's tokens in order)."""
    rows, at = [], 0
    for seq in plan.seqs:
        if seq.prompt_logprobs is not None:
            rows.extend(range(at, at + seq.num_new))
        at += seq.num_new
    return rows


class PromptLogprobs:
    """Turns the logits of `prompt_rows(plan)` into per-token logprobs, carrying each sequence's last
    row over to its next chunk."""

    def __init__(self) -> None:
        self._carry: dict[int, torch.Tensor] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._carry.pop(seq_id, None)

    def compute(self, plan: BatchPlan, logits: torch.Tensor) -> list[list[TokenLogprobs | None] | None]:
        """Per sequence of `plan`: for each token it was fed this step, its logprob and its
        `prompt_logprobs` likeliest alternatives (None where unknown); None for sequences that did
        not ask. One log-softmax, gather and top-k for all rows."""
        wanted = [seq for seq in plan.seqs if seq.prompt_logprobs is not None]
        logprobs = logits.float().log_softmax(-1)
        # Each row's target is the next token of its chunk; a chunk's last row has none yet (itself: ignored).
        targets = [t for seq in wanted for t in seq.token_ids[1:] + seq.token_ids[-1:]]
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1))
        ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
        k = max(seq.prompt_logprobs or 0 for seq in wanted)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        top_lp, top_ids, chosen_lp = top_lp.tolist(), top_ids.tolist(), chosen.squeeze(1).tolist()
        by_seq: dict[int, list[TokenLogprobs | None]] = {}
        row = 0
        for seq in wanted:
            keep = seq.prompt_logprobs or 0
            entries = [self._first(seq.seq_id, seq.token_ids[0], keep) if seq.start_pos > 0 else None]
            for j, token in enumerate(seq.token_ids[1:]):
                r = row + j
                entries.append(TokenLogprobs(token, chosen_lp[r], ranks[r], tuple(zip(top_ids[r][:keep],
                                                                                       top_lp[r][:keep]))))
            row += seq.num_new
            self._carry[seq.seq_id] = logprobs[row - 1].clone()
            by_seq[seq.seq_id] = entries
        return [by_seq.get(seq.seq_id) for seq in plan.seqs]

    def _first(self, seq_id: int, token: int, keep: int) -> TokenLogprobs | None:
        """The first token of a chunk, scored by the previous chunk's last row (None if unknown)."""
        carried = self._carry.pop(seq_id, None)
        if carried is None:
            return None
        value = carried[token]
        top = carried.topk(keep) if keep else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return TokenLogprobs(token, float(value), int((carried > value).sum()) + 1, alternatives)
