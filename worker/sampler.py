"""Pick the next token of every request from its logits, for the whole batch at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_cache.kernels import greedy_tokens
from hybrid_cache.plan import BatchPlan, SampledTokens, SamplingParams, TokenLogprobs
from worker.logits_adjust import adjust_logits
from worker.prompt_logprobs import PromptLogprobs

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int) -> int:
    """A request's seed folded into the 32 bits torch's CPU generator keeps (splitmix64, then high ^ low).

    `torch.Generator.manual_seed` on the CPU keeps only the low 32 bits, so seeds that differ by 2**32
    would give the same stream; mixing all 64 bits first makes every bit of the seed count.
    """
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


class Sampler:
    """Greedy, temperature, min-p, top-k and top-p sampling after penalties, logit bias and
    `min_tokens` (`worker/logits_adjust.py`); a request with a seed has its own generator; log
    probabilities (of the raw logits) for the requests that ask.

    The batch is filtered in a few tensor operations (no Python loop per row); a token is drawn by the
    exponential race (argmax of `p / E`, `E ~ Exp(1)`, which picks token i with probability p_i), one
    draw of noise for all unseeded rows and one per seeded row, from that request's generator, so a
    seeded request's tokens depend only on its seed and its logits, whatever else is in the batch.

    `sample_step` also keeps each sequence's tokens (every token a plan feeds it: the prompt chunks,
    then each sampled token), which penalties and `min_tokens` read. A prompt's early chunks come
    without their request's sampling fields (they sample nothing), so the history is kept for every
    sequence; where a request's output starts is where it first samples with its own fields.
    """

    def __init__(self, device: torch.device, seed: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        self._shared = torch.Generator(device=device).manual_seed(seed)
        self._seeded: dict[int, torch.Generator] = {}
        self._history: dict[int, list[int]] = {}
        self._prompt_len: dict[int, int] = {}
        self._prompt = PromptLogprobs()

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._seeded.pop(seq_id, None)
            self._history.pop(seq_id, None)
            self._prompt_len.pop(seq_id, None)
        self._prompt.forget(seq_ids)

    def sample_step(
        self, logits: torch.Tensor, plan: BatchPlan, prompt_logits: torch.Tensor | None = None
    ) -> SampledTokens:
        """One token per sequence of `plan` (rows of `logits` in plan order), with the log
        probabilities asked for; records the tokens the plan fed each sequence first.
        `prompt_logits` are the logits of `prompt_rows(plan)` (`worker/prompt_logprobs.py`)."""
        seq_ids = [s.seq_id for s in plan.seqs]
        params = [s.sampling for s in plan.seqs]
        for seq in plan.seqs:
            if seq.fork_of is not None and seq.seq_id not in self._history:
                self._history[seq.seq_id] = self._history.get(seq.fork_of, [])[: seq.start_pos]
            history = self._history.setdefault(seq.seq_id, [])
            del history[seq.start_pos:]  # a re-prefill (after a preemption) feeds the tokens again
            history.extend(seq.token_ids)
        adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
        # Greedy rows are picked from the logits in their own dtype (a float32 copy of a bf16 batch cost
        # a quarter of a millisecond at batch 16); rows that adjust or sample are made float32 first.
        scores = logits
        if adjusted:
            for i in adjusted:
                self._prompt_len.setdefault(seq_ids[i], len(self._history[seq_ids[i]]))
            scores = logits.to(torch.float32, copy=True)
            scores[adjusted] = adjust_logits(
                scores[adjusted], [self._history[seq_ids[i]] for i in adjusted],
                [self._prompt_len[seq_ids[i]] for i in adjusted], [params[i] for i in adjusted], self.eos_token_ids,
            )
        tokens = self.sample(scores, seq_ids, params)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = token_logprobs(logits, tokens, wanted, [params[i].logprobs or 0 for i in wanted]) if wanted else None
        prompt = self._prompt.compute(plan, prompt_logits) if prompt_logits is not None else None
        return SampledTokens(tokens, logprobs, prompt)

    def _generator(self, seq_id: int, seed: int) -> torch.Generator:
        if seq_id not in self._seeded:
            self._seeded[seq_id] = torch.Generator(device=self.device).manual_seed(mix_seed(seed))
        return self._seeded[seq_id]

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]) -> list[int]:
        """One token id per row of `logits` `[B, vocab]` (any float dtype; sampled rows in float32)."""
        tokens = greedy_tokens(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens.tolist()
        chosen = [params[i] for i in rows]
        probs = filtered_probs_batch(logits[rows].float(), chosen)
        noise = torch.empty_like(probs)
        unseeded = [j for j, p in enumerate(chosen) if p.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=self._shared
            )
        for j, p in enumerate(chosen):
            if p.seed is not None:
                noise[j].exponential_(generator=self._generator(seq_ids[rows[j]], p.seed))
        tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens.tolist()


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], rows: list[int], top: list[int]
) -> list[TokenLogprobs | None]:
    """For each row in `rows`: the log probability of its sampled token under `logits` (log-softmax),
    its rank, and the `top[j]` likeliest tokens; None for the other rows. One batched pass."""
    logprobs = logits[rows].float().log_softmax(-1)
    chosen = torch.tensor([tokens[i] for i in rows], device=logits.device).unsqueeze(1)
    chosen_lp = logprobs.gather(1, chosen)
    ranks = ((logprobs > chosen_lp).sum(-1) + 1).tolist()
    k = max(top)
    best_lp, best_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, :0])
    best_lp, best_ids, chosen_lp = best_lp.tolist(), best_ids.tolist(), chosen_lp.squeeze(1).tolist()
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    for j, i in enumerate(rows):
        alternatives = tuple(zip(best_ids[j][: top[j]], best_lp[j][: top[j]]))
        out[i] = TokenLogprobs(tokens[i], chosen_lp[j], ranks[j], alternatives)
    return out


def filtered_probs_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, then min-p, top-k and top-p (nucleus) filtering of rows
    `[B, vocab]` (vLLM's order)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    scaled = logits / temperature
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    vocab = scaled.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        largest = torch.topk(scaled, max(top_k), dim=-1).values
        k = torch.tensor(top_k, device=device)
        kth = largest.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        part = scaled[nucleus]
        top_p = torch.tensor([params[j].top_p for j in nucleus], device=device).unsqueeze(1)
        sorted_logits, order = part.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens before it already cover top_p; the first token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        scaled[nucleus] = part.masked_fill(drop, float("-inf"))
    return scaled.softmax(-1)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`filtered_probs_batch` for one row of logits `[vocab]`."""
    return filtered_probs_batch(logits.unsqueeze(0), [params])[0]
