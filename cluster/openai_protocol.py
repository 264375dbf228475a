"""OpenAI-compatible request bodies and error shapes (the subset the engine serves).

Fields follow OpenAI's API plus vLLM's extras (`top_k`, `ignore_eos`, `stop_token_ids`) and ours
(`cache_type`). Unknown fields are ignored, as vLLM does, so stock clients work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hybrid_cache.plan import SamplingParams


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
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_type: Literal["kv", "hidden"] | None = None
    ttft_slo_ms: float | None = Field(None, gt=0, description="this request's time-to-first-token SLO")
    tbt_slo_ms: float | None = Field(None, gt=0, description="this request's time-between-tokens SLO")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        return best_of

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Engine sampling params; `max_tokens` defaults to what the context leaves, and may not exceed it."""
        room = max_model_len - prompt_len
        if room <= 0:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{prompt_len} tokens (at least one must be left to generate)",
                param="prompt",
            )
        max_tokens = self.max_tokens if self.max_tokens is not None else room
        if self.max_tokens is not None and prompt_len + self.max_tokens > max_model_len:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens, but {prompt_len} prompt tokens "
                f"plus max_tokens={self.max_tokens} exceed it",
                param="max_tokens",
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=max(self.top_k, 0),  # vLLM uses -1 for "off"
                seed=self.seed,
                stop=tuple(stop),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
            )
        except ValueError as err:
            raise OpenAIError(400, str(err)) from err


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(prompt_len, max_model_len)
