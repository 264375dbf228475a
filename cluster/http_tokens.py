"""vLLM's utility endpoints: `POST /tokenize`, `POST /detokenize` and `GET /version`.

`/tokenize` takes a `prompt` (encoded as `/v1/completions` encodes it) or chat `messages` (through the
chat template, as `/v1/chat/completions` does), so a client can count a request's tokens before
sending it. `/detokenize` turns token ids back into text; ids outside the vocabulary are a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import InvalidField, ModelNotFound
from cluster.openai_protocol import ChatMessage

if TYPE_CHECKING:
    from cluster.http_server import Frontend

PACKAGE = "aptserve"


def server_version() -> str:
    """The installed package's version (`pyproject.toml`), or `unknown` when run from an uninstalled tree."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


class TokenizeRequest(BaseModel):
    """Exactly one of `prompt` and `messages`; `model`, when given, must be the one served."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="prompt only: the tokenizer's BOS/EOS, as completions adds")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def add_token_routes(app: FastAPI, front: Callable[[], Frontend]) -> None:
    """Register the three routes on `app`; `front()` is the front end served (it raises 503 while none is)."""

    def check_model(f: Frontend, model: str | None) -> None:
        if model is not None and model != f.model_name:
            err = ModelNotFound(f"The model `{model}` does not exist (serving `{f.model_name}`)")
            raise f.error(f.refused(err, param="model")) from None

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        f = front()
        check_model(f, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise f.error(f.refused(InvalidField("prompt", "give exactly one of prompt and messages")))
        try:
            if body.messages is not None:
                tokens = f.tokenizer.apply_chat_template([m.for_template() for m in body.messages])
            else:
                tokens = f.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except InvalidField as err:
            raise f.error(f.refused(err)) from err
        return {"count": len(tokens), "max_model_len": f.gateway.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        f = front()
        check_model(f, body.model)
        vocab = f.gateway.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            err = InvalidField("tokens", f"token id {bad} is outside the vocabulary (ids 0..{vocab - 1})")
            raise f.error(f.refused(err))
        return {"prompt": f.tokenizer.decode(body.tokens)}

    @app.get("/version")
    async def version() -> dict:
        return {"version": server_version()}
