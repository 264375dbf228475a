"""Stop conditions, output text and the outputs callers see: what happens to a request after each step."""

from __future__ import annotations

from hybrid_cache.plan import TokenLogprobs
from scheduler_service.executor import Detokenizer
from scheduler_service.request import FinishReason, Request, RequestOutput


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


def request_output(request: Request, new: list[int], new_logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
    """What the caller sees of `request` now: its tokens so far and `new` (this step's), its text, and
    whether it ended (for a group of samples, only the group's last output says `finished`)."""
    # Built for every generated token: each request field is read once.
    ended = request.is_finished
    outputs, params, group = request.output_token_ids, request.params, request.group
    reason, cache_type = request.finish_reason, request.cache_type
    return RequestOutput(
        request.request_id,
        request.prompt_token_ids,
        list(outputs),
        new,
        request.text,
        ended if group is None else group.reports_end(request),
        reason._value_ if reason is not None else None,  # `_value_`: `Enum.value` is a slow descriptor
        cache_type._value_ if cache_type is not None else None,
        request.num_preemptions,
        error=request.error,
        new_logprobs=new_logprobs,
        logprobs=request.logprobs if ended and params.logprobs is not None else None,
        # With the first token (and the last output): what `echo` shows before the output's own.
        prompt_logprobs=request.prompt_logprobs if params.prompt_logprobs is not None and (
            len(outputs) == 1 or ended) else None,
        stop_reason=request.stop_reason,
        index=request.sample_index,
    )


def record_prompt_logprobs(request: Request, start: int, entries: list[TokenLogprobs | None]) -> None:
    """Entries for the prompt positions `start..` (any past the prompt, in a re-prefill, dropped)."""
    known = request.prompt_logprobs
    end = min(len(request.prompt_token_ids), start + len(entries))
    known.extend([None] * (start - len(known)))
    known[start:end] = entries[: end - start]
