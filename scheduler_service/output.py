"""Stop conditions and output text: what happens to a request after each sampled token."""

from __future__ import annotations

from scheduler_service.executor import Detokenizer
from scheduler_service.request import FinishReason, Request


def append_token(
    request: Request, token: int, eos_token_ids: tuple[int, ...], max_model_len: int, detokenizer: Detokenizer | None
) -> FinishReason | None:
    """Add `token` to `request`, refresh its text, and say whether it must stop now.

    EOS (unless `ignore_eos`), a stop token id or a stop string stops it, once it has `min_tokens`
    tokens (the sampler keeps stop tokens out before that; a stop string found earlier is ignored, as
    in vLLM). A stop string is cut from the text, with what follows it, and a stop token's text is
    left out, unless `include_stop_str_in_output`. `request.stop_reason` names the stop string or
    stop token id.
    """
    request.output_token_ids.append(token)
    params = request.params
    reason = None
    may_stop = len(request.output_token_ids) >= params.min_tokens
    if may_stop and token in params.stop_token_ids:
        reason, request.stop_reason = FinishReason.STOP, token
    elif may_stop and not params.ignore_eos and token in eos_token_ids:
        reason = FinishReason.STOP
    elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= max_model_len:
        reason = FinishReason.LENGTH
    if detokenizer is not None:
        previous = len(request.text)
        # As vLLM: the text of the token that stopped the request (EOS, a stop token id) is left out,
        # unless `include_stop_str_in_output`.
        tokens = request.output_token_ids
        if reason is FinishReason.STOP and not params.include_stop_str_in_output:
            tokens = tokens[:-1]
        request.text = detokenizer.decode(tokens)
        if params.stop and may_stop:
            # Only the new text (plus the tail a stop string may straddle) can hold a new match.
            start = max(0, previous - max(len(s) for s in params.stop) + 1)
            hits = [(i, s) for i, s in ((request.text.find(s, start), s) for s in params.stop) if i >= 0]
            if hits:
                at, stop = min(hits)
                request.text = request.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                reason, request.stop_reason = FinishReason.STOP, stop
    return reason
