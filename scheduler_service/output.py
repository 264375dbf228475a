"""Stop conditions and output text: what happens to a request after each sampled token."""

from __future__ import annotations

from scheduler_service.executor import Detokenizer
from scheduler_service.request import FinishReason, Request


def append_token(
    request: Request, token: int, eos_token_ids: tuple[int, ...], max_model_len: int, detokenizer: Detokenizer | None
) -> FinishReason | None:
    """Add `token` to `request`, refresh its text, and say whether it must stop now."""
    request.output_token_ids.append(token)
    params = request.params
    reason = None
    if (not params.ignore_eos and token in eos_token_ids) or token in params.stop_token_ids:
        reason = FinishReason.STOP
    elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= max_model_len:
        reason = FinishReason.LENGTH
    if detokenizer is not None:
        previous = len(request.text)
        request.text = detokenizer.decode(request.output_token_ids)
        if params.stop:
            # Only the new text (plus the tail a stop string may straddle) can hold a new match.
            start = max(0, previous - max(len(s) for s in params.stop) + 1)
            hits = [i for i in (request.text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                request.text = request.text[: min(hits)]
                reason = FinishReason.STOP
    return reason
