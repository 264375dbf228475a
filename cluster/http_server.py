"""An OpenAI-compatible HTTP front end over one in-process `AsyncEngine` (FastAPI).

`aptserve serve` runs it with uvicorn on 127.0.0.1. (The Ray Serve deployment of a later issue wraps
the same routes.)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.tokenizer import Tokenizer
from hybrid_cache.layout import HiddenCacheUnavailable
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.engine import QueueFull
from scheduler_service.request import RequestOutput


def _visible(text: str, stops: tuple[str, ...], finished: bool) -> str:
    """Text safe to send: hold back what a stop string may still cut, and half-decoded characters."""
    if finished:
        return text
    if stops:
        text = text[: max(0, len(text) - (max(len(s) for s in stops) - 1))]
    return text.rstrip("\ufffd")


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="Apt-Serve", description="OpenAI-compatible LLM serving on a hybrid cache")
    max_model_len = engine.engine.info.max_model_len
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(OpenAIError(400, problems).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "aptserve",
                "max_model_len": max_model_len}
        return {"object": "list", "data": [card]}

    def start(body: CompletionRequest | ChatCompletionRequest, prompt: list[int]) -> tuple[str, AsyncIterator]:
        if body.model != model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist (serving `{model_name}`)",
                              kind="not_found_error", param="model")
        params = body.sampling_params(len(prompt), max_model_len)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            slos = {
                "ttft_slo_s": body.ttft_slo_ms / 1000 if body.ttft_slo_ms else None,
                "tbt_slo_s": body.tbt_slo_ms / 1000 if body.tbt_slo_ms else None,
            }
            return request_id, engine.generate(prompt, params, request_id, body.cache_type, **slos)
        except QueueFull as err:
            raise OpenAIError(503, str(err), kind="overloaded_error", headers={"Retry-After": "1"}) from err
        except HiddenCacheUnavailable as err:
            raise OpenAIError(400, str(err), param="cache_type") from err
        except ValueError as err:
            raise OpenAIError(400, str(err), param="prompt") from err

    def usage(final: RequestOutput) -> dict:
        prompt, completion = len(final.prompt_token_ids), len(final.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def run(body, prompt: list[int], chat: bool):  # noqa: ANN202 - a JSON or a streaming response
        request_id, outputs = start(body, prompt)
        stops = tuple([body.stop] if isinstance(body.stop, str) else body.stop or [])
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            final = None
            async for output in outputs:
                final = output
            choice = {"index": 0, "finish_reason": final.finish_reason}
            choice |= {"message": {"role": "assistant", "content": final.text}} if chat else {"text": final.text}
            return {"id": request_id, "object": kind, "created": int(time.time()), "model": model_name,
                    "choices": [choice], "usage": usage(final)}

        async def events() -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": request_id, "object": chunk_kind, "created": int(time.time()), "model": model_name}
            sent = 0
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps(head | {'choices': [first]})}\n\n"
            final = None
            async for final in outputs:
                text = _visible(final.text, stops, final.finished)
                delta, sent = text[sent:], max(sent, len(text))
                if not delta and not final.finished:
                    continue
                choice = {"index": 0, "finish_reason": final.finish_reason}
                choice |= {"delta": {"content": delta}} if chat else {"text": delta}
                yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
            if body.stream_options and body.stream_options.include_usage and final is not None:
                yield f"data: {json.dumps(head | {'choices': [], 'usage': usage(final)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):  # noqa: ANN202
        if isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = body.prompt
        return await run(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202
        prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        return await run(body, prompt, chat=True)

    return app
