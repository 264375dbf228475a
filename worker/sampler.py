"""Pick the next token of every request from its logits."""

from __future__ import annotations

import torch

from hybrid_cache.plan import SamplingParams


class Sampler:
    """Greedy, temperature, top-k and top-p sampling; a request with a seed has its own generator.

    A seeded request's tokens depend only on its seed and its logits, whatever else is in the batch.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._shared = torch.Generator(device=device).manual_seed(seed)
        self._seeded: dict[int, torch.Generator] = {}

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._seeded.pop(seq_id, None)

    def _generator(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        if seq_id not in self._seeded:
            self._seeded[seq_id] = torch.Generator(device=self.device).manual_seed(params.seed)
        return self._seeded[seq_id]

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]) -> list[int]:
        """One token id per row of `logits` `[B, vocab]`."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, (seq_id, p) in enumerate(zip(seq_ids, params)):
            if not p.greedy:
                probs = filtered_probs(logits[row], p)
                tokens[row] = torch.multinomial(probs, 1, generator=self._generator(seq_id, p))[0]
        return tokens.tolist()


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering of one row of logits."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already cover top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return scaled.softmax(-1)
