"""OpenAI-compatible request bodies and error shapes (the subset the engine serves).

Fields follow OpenAI's API plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`) and ours (`cache_type`). A known field
that would change the output and is not implemented (`tools`, `response_format`, ...) is refused with
a 400 naming it when set to anything but its "off" value; fields that change nothing (`user`,
`metadata`, ...) and unknown ones are ignored, as vLLM does, so stock clients work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.errors import Failure, InvalidField
from cluster.request_params import sampling_params
from hybrid_cache.plan import MAX_LOGPROBS, SamplingParams

# Fields of OpenAI's and vLLM's APIs that would change the output and are not implemented here, each
# with the values that mean "off" (what stock clients send when their user did not set the field).
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "prompt_logprobs": (None,), "length_penalty": (None, 1, 1.0),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "parallel_tool_calls": (None,),
    "suffix": (None, ""), "use_beam_search": (None, False), "allowed_token_ids": (None,),
    "bad_words": (None, []), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "logits_processors": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structured_outputs": (None,),
    "prediction": (None,), "modalities": (None, ["text"]), "audio": (None,), "reasoning_effort": (None,),
    "top_a": (None, 0, 0.0), "typical_p": (None, 1, 1.0), "mirostat": (None, 0),
}


def _is_off(value: object, offs: tuple[object, ...]) -> bool:
    # `type(...) is` as well: False == 0 and 1 == True must not pass for each other.
    return any(value is off or (type(value) is type(off) and value == off) for off in offs)


class OpenAIError(Exception):
    """An error answered with OpenAI's JSON shape and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    @classmethod
    def of(cls, failure: Failure, retry_after_s: int) -> OpenAIError:
        kind = failure.kind
        headers = {"Retry-After": str(retry_after_s)} if kind.retry_later else None
        return cls(kind.status, failure.message, kind.openai_type, failure.param, headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, description="tokens to generate; default: up to the context")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    min_p: float | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_type: Literal["kv", "hidden"] | None = None
    priority: int = Field(0, description="vLLM's: lower runs first (both policies honour it)")
    ttft_slo_ms: float | None = Field(None, gt=0, description="this request's time-to-first-token SLO")
    tbt_slo_ms: float | None = Field(None, gt=0, description="this request's time-between-tokens SLO")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        if isinstance(data, dict):
            for name, offs in UNSUPPORTED.items():
                if name in data and not _is_off(data[name], offs):
                    raise InvalidField(name, f"`{name}` is not supported by this server; leave it unset")
        return data

    @field_validator("stream")
    @classmethod
    def _best_of_not_streamed(cls, stream: bool, info: ValidationInfo) -> bool:
        # The best `n` of `best_of` samples are known only when all have ended (OpenAI's rule too).
        best_of, n = info.data.get("best_of"), info.data.get("n", 1)
        if stream and best_of is not None and isinstance(n, int) and best_of > n:
            raise ValueError(f"best_of={best_of} > n={n} cannot be streamed: the best samples are known at the end")
        return stream

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives to report per token (None: no logprobs); each request type says."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The same for prompt tokens (completions with `echo`)."""
        return None

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Engine sampling params (`cluster/request_params.py`). Raises `InvalidField`."""
        return sampling_params(
            prompt_len, max_model_len, max_tokens=self.max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias, min_p=self.min_p,
            min_tokens=self.min_tokens, logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output, n=self.n, best_of=self.best_of,
        )

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else self.stop or [])


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="text, token ids, or a batch of either (one choice per prompt)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives reported per token")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, (str, list)) and not p for p in prompt)):
            raise ValueError("give a prompt: an empty list or an empty prompt in a batch is not one")
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch (one, unless a list of texts or of token-id lists was given)."""
        if isinstance(self.prompt, str) or not isinstance(self.prompt[0], (str, list)):
            return [self.prompt]
        return list(self.prompt)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; its content is text or a list of text parts (joined by newlines, as vLLM does).
    `developer` is OpenAI's newer name for `system`: the chat template sees `system`."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives reported per token")
    echo: bool = False  # vLLM's chat echo (the last message's text first) is not implemented: refused

    @field_validator("echo")
    @classmethod
    def _no_chat_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported for chat completions (only /v1/completions)")
        return echo

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(prompt_len, max_model_len)
