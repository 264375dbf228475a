"""The OpenAI-compatible HTTP front end (FastAPI) over a `Gateway`: one engine, or Ray replicas.

The same app runs under uvicorn over an in-process engine (tests) and as the Ray Serve ingress
(`cluster/serve_app.py`). What it serves is the `Frontend` given to `build_app`, or the one a Serve replica installs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster import metrics
from cluster.gateways import ENGINE_FAILURES, Gateway
from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.tokenizer import Tokenizer
from hybrid_cache.layout import HiddenCacheUnavailable
from scheduler_service.engine import QueueFull
from scheduler_service.request import RequestOutput


@dataclass
class Frontend:
    """What the routes serve: the engines, the tokenizer, the model's public name, the time limit."""

    gateway: Gateway
    tokenizer: Tokenizer
    model_name: str
    request_timeout_s: float


def _visible(text: str, stops: tuple[str, ...], finished: bool) -> str:
    """Text safe to send: hold back what a stop string may still cut, and half-decoded characters."""
    if finished:
        return text
    if stops:
        text = text[: max(0, len(text) - (max(len(s) for s in stops) - 1))]
    return text.rstrip("\ufffd")


_installed: list[Frontend] = []


def install_frontend(frontend: Frontend) -> None:
    """Serve this frontend from every app in this process built without one (a Ray Serve replica:
    Serve runs its own copy of the app object, so the replica cannot hand the frontend to it directly)."""
    _installed[:] = [frontend]


def installed_frontend() -> Frontend | None:
    return _installed[0] if _installed else None


def build_app(frontend: Frontend | None = None) -> FastAPI:
    """The routes, serving `frontend`, or the one installed in this process when None."""
    app = FastAPI(title="Apt-Serve", description="OpenAI-compatible LLM serving on a hybrid cache")
    created = int(time.time())

    def front() -> Frontend:
        current = frontend or installed_frontend()
        if current is None:
            raise OpenAIError(503, "the server is starting", kind="server_error", headers={"Retry-After": "1"})
        return current

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(OpenAIError(400, problems).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await front().gateway.healthy()
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        f = front()
        page = metrics.render(f.model_name, await f.gateway.replica_stats())
        return Response(page, media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        f = front()
        card = {"id": f.model_name, "object": "model", "created": created, "owned_by": "aptserve",
                "max_model_len": f.gateway.max_model_len}
        return {"object": "list", "data": [card]}

    async def start(body: CompletionRequest | ChatCompletionRequest, prompt: list[int]) -> tuple[str, AsyncIterator]:
        f = front()
        if body.model != f.model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist (serving `{f.model_name}`)",
                              kind="not_found_error", param="model")
        params = body.sampling_params(len(prompt), f.gateway.max_model_len)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            slos = {
                "ttft_slo_s": body.ttft_slo_ms / 1000 if body.ttft_slo_ms else None,
                "tbt_slo_s": body.tbt_slo_ms / 1000 if body.tbt_slo_ms else None,
            }
            stream = await f.gateway.generate(prompt, params, request_id, body.cache_type, **slos)
            return request_id, _with_deadline(stream, f.request_timeout_s)
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
        request_id, outputs = await start(body, prompt)
        model_name = front().model_name
        stops = tuple([body.stop] if isinstance(body.stop, str) else body.stop or [])
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            final = None
            try:
                async for output in outputs:
                    final = output
            except RequestTimeout as err:
                raise OpenAIError(504, str(err), kind="timeout_error") from err
            if final is None or final.finish_reason == "error":
                message = final.error if final is not None else "the engine ended the request without output"
                raise OpenAIError(503, message or "the model workers failed", kind="server_error")
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
            try:
                async for final in outputs:
                    if final.finish_reason == "error":
                        raise OpenAIError(503, final.error or "the model workers failed", kind="server_error")
                    text = _visible(final.text, stops, final.finished)
                    delta, sent = text[sent:], max(sent, len(text))
                    if not delta and not final.finished:
                        continue
                    choice = {"index": 0, "finish_reason": final.finish_reason}
                    choice |= {"delta": {"content": delta}} if chat else {"text": delta}
                    yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
            except (RequestTimeout, OpenAIError) as err:  # the status is sent already: an error event
                error = err if isinstance(err, OpenAIError) else OpenAIError(504, str(err), kind="timeout_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if body.stream_options and body.stream_options.include_usage and final is not None:
                yield f"data: {json.dumps(head | {'choices': [], 'usage': usage(final)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):  # noqa: ANN202
        prompt = front().tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        return await run(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202
        prompt = front().tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        return await run(body, prompt, chat=True)

    return app


class RequestTimeout(Exception):
    """A request ran past `server.request_timeout_s`: it is aborted (504, or an error event on a stream)."""


async def _with_deadline(stream: AsyncIterator[RequestOutput], timeout_s: float) -> AsyncIterator[RequestOutput]:
    """`stream`, ended (and its request aborted, by closing it) once `timeout_s` have passed; an engine
    that failed under it becomes a 503 `OpenAIError`.

    Each output is awaited in this task (no helper task), so a cancelled consumer can close `stream`.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    output = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeout(f"the request took longer than {timeout_s:g} s and was aborted") from None
            except ENGINE_FAILURES as err:
                raise OpenAIError(503, str(err), kind="server_error", headers={"Retry-After": "1"}) from err
            yield output
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # aborts the request if it has not ended
