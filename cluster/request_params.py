"""The one place a request's sampling fields become engine `SamplingParams`, for HTTP and gRPC alike.

`SamplingParams` itself validates every value (and names the field at fault); this adds what only the
front end knows: the context the prompt leaves, which bounds `max_tokens` and is its default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.errors import InvalidField, field_named_in
from hybrid_cache.plan import SamplingParams

FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "stop", "ignore_eos",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens",
          "logprobs", "include_stop_str_in_output", "prompt_logprobs", "n", "best_of")

# Every request field an error message may name (the engine's included: it checks the prompt and SLOs).
REQUEST_FIELDS = frozenset(FIELDS) | {"prompt", "model", "cache_type", "ttft_slo_ms", "tbt_slo_ms", "messages",
                                     "top_logprobs", "echo", "priority"}


def sampling_params(
    prompt_len: int,
    max_model_len: int,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: Mapping[str | int, float] | None = None,
    min_p: float | None = None,
    min_tokens: int | None = None,
    logprobs: int | None = None,
    include_stop_str_in_output: bool = False,
    prompt_logprobs: int | None = None,
    n: int = 1,
    best_of: int | None = None,
) -> SamplingParams:
    """Engine sampling params (None: the engine's default); `max_tokens` defaults to what the context
    leaves and may not exceed it. Raises `InvalidField` naming the field at fault."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise InvalidField("prompt", f"This model's maximum context length is {max_model_len} tokens, but the "
                           f"prompt has {prompt_len} tokens (at least one must be left to generate)")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise InvalidField("max_tokens", f"This model's maximum context length is {max_model_len} tokens, but "
                           f"{prompt_len} prompt tokens plus max_tokens={max_tokens} exceed it")
    optional = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty, "repetition_penalty": repetition_penalty, "logit_bias": logit_bias,
        "min_p": min_p, "min_tokens": min_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
    }
    given = {name: value for name, value in optional.items() if value is not None}
    try:
        return SamplingParams(
            max_tokens=room if max_tokens is None else max_tokens,
            stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
            include_stop_str_in_output=include_stop_str_in_output, n=n, best_of=best_of, **given,
        )
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidField(field_named_in(str(err), FIELDS), str(err)) from err
