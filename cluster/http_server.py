"""The OpenAI-compatible HTTP front end (FastAPI) over a `Gateway`: one engine, or Ray replicas.

The same app runs under uvicorn over an in-process engine (tests) and as the Ray Serve ingress
(`cluster/serve_app.py`). What it serves is the `Frontend` given to `build_app`, or the one a Serve replica installs.
Every error is answered in OpenAI's shape with a short message (`cluster/errors.py`); nothing internal
(a traceback, a path, an id) reaches a client.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cluster import metrics
from cluster.auth import ApiKeyMiddleware
from cluster.config import AptServeConfig, ServerConfig
from cluster.errors import (
    ENGINE_FAILED_REQUEST,
    Failure,
    InvalidField,
    Kind,
    ModelNotFound,
    classify,
    field_named_in,
    one_line,
)
from cluster.gateways import Gateway, service_status, serving
from cluster.http_body import strict_route
from cluster.http_tokens import add_token_routes
from cluster.openai_choices import Choice, choice_for
from cluster.openai_protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.request_params import REQUEST_FIELDS
from cluster.streams import Deadline, merged
from cluster.tokenizer import Tokenizer
from scheduler_service.request import RequestOutput
from scheduler_service.samples import kept_samples
from worker.loader import generation_defaults

log = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", CompletionRequest, ChatCompletionRequest)

_SERVER_DEFAULTS = ServerConfig.model_fields  # the limits of a front end built without a config (tests)

# Refusals the engine counts itself (at admission): the ingress counts every other refusal.
_ENGINE_COUNTED = (Kind.INVALID, Kind.OVERLOADED)


@dataclass
class Frontend:
    """What the routes serve: the engines, the tokenizer, the model's public name, the limits."""

    gateway: Gateway
    tokenizer: Tokenizer
    model_name: str
    request_timeout_s: float
    retry_after_s: int = _SERVER_DEFAULTS["retry_after_s"].default
    max_body_bytes: int = _SERVER_DEFAULTS["max_body_bytes"].default
    counters: metrics.IngressCounters = field(default_factory=metrics.IngressCounters)
    # Requests must carry `Authorization: Bearer <api_key>` (None: no key asked); see `cluster/auth.py`.
    api_key: str | None = field(default=None, repr=False)
    # What a request's unset sampling fields default to: the model's generation_config.json
    # (`worker.loader.generation_defaults`), by request field name.
    generation_defaults: dict[str, float | int] = field(default_factory=dict)

    def error(self, failure: Failure) -> OpenAIError:
        return OpenAIError.of(failure, self.retry_after_s)

    def refused(self, err: BaseException, *, engine_checked: bool = False, param: str | None = None) -> Failure:
        """The answer to a request refused with `err`, counted once: by the engine when it checked the
        request and refused it at admission, else here."""
        failure = classify(err, param, REQUEST_FIELDS)
        if not (engine_checked and failure.kind in _ENGINE_COUNTED):
            self.counters.reject(failure.kind.name.lower())
        return failure

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (UnicodeError, ValueError, TypeError) as err:
            raise InvalidField("prompt", f"the prompt cannot be tokenized: {one_line(str(err))}") from err


def build_frontend(config: AptServeConfig, gateway: Gateway, tokenizer: Tokenizer) -> Frontend:
    """The frontend of `gateway`, with the limits, key and sampling defaults of `config.server`."""
    server = config.server
    defaults = generation_defaults(config.model.path) if server.generation_config == "auto" else {}
    return Frontend(gateway, tokenizer, config.model_name, server.request_timeout_s,
                    retry_after_s=server.retry_after_s, max_body_bytes=server.max_body_bytes,
                    api_key=server.resolved_api_key(), generation_defaults=defaults)


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

    def current() -> Frontend | None:
        return frontend or installed_frontend()

    def setting(name: str) -> int:
        """A limit of the frontend served, or its default while none is installed."""
        f = current()
        return getattr(f, name) if f is not None else _SERVER_DEFAULTS[name].default

    def front() -> Frontend:
        f = current()
        if f is None:
            raise OpenAIError(503, "the server is starting", kind="server_error",
                              headers={"Retry-After": str(setting("retry_after_s"))})
        return f

    def reject(reason: str) -> None:
        f = current()
        if f is not None:
            f.counters.reject(reason)

    app.router.route_class = strict_route(lambda: setting("max_body_bytes"))
    app.add_middleware(ApiKeyMiddleware, current_key=lambda: getattr(current(), "api_key", None),
                       on_refused=lambda: reject("unauthorized"))

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for e in err.errors():
            message = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] == "json_invalid":  # its location is a character offset, not a field
                problems.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', message)}")
                continue
            where = ".".join(str(p) for p in e["loc"][1:])
            problems.append(f"{where}: {message}" if where else message)
            params.append(str(e["loc"][1]) if len(e["loc"]) > 1 else field_named_in(message, UNSUPPORTED))
        reject(Kind.INVALID.name.lower())
        error = OpenAIError(400, one_line("; ".join(problems)), param=params[0] if params else None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        if request.method == "POST" and err.status_code < 500:
            reject("too_large" if err.status_code == 413 else Kind.INVALID.name.lower())
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        error = OpenAIError(err.status_code, one_line(str(err.detail)), kind=kind)
        return JSONResponse(error.body(), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        failure = classify(err)  # logs an exception of no known kind
        if failure.kind is not Kind.INTERNAL:
            reject(failure.kind.name.lower())
        error = OpenAIError.of(failure, setting("retry_after_s"))
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        states = await front().gateway.health()
        return JSONResponse({"status": service_status(states), "replicas": states},
                            status_code=200 if serving(states) else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        f = front()
        page = metrics.render(f.model_name, await f.gateway.replica_stats(), f.counters.rejected())
        return Response(page, media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        f = front()
        card = {"id": f.model_name, "object": "model", "created": created, "owned_by": "aptserve",
                "max_model_len": f.gateway.max_model_len}
        return {"object": "list", "data": [card]}

    async def start(body: CompletionRequest | ChatCompletionRequest, prompt: list[int],
                    received_at: float) -> tuple[str, Deadline]:
        f = front()
        body = with_defaults(body, f.generation_defaults, f.gateway.max_model_len - len(prompt))
        try:
            if body.model != f.model_name:
                raise ModelNotFound(f"The model `{body.model}` does not exist (serving `{f.model_name}`)")
            params = body.sampling_params(len(prompt), f.gateway.max_model_len)
        except (ModelNotFound, InvalidField) as err:
            raise f.error(f.refused(err, param="model" if isinstance(err, ModelNotFound) else None)) from err
        request_id = f"cmpl-{uuid.uuid4().hex}"
        slos = {
            "ttft_slo_s": body.ttft_slo_ms / 1000 if body.ttft_slo_ms else None,
            "tbt_slo_s": body.tbt_slo_ms / 1000 if body.tbt_slo_ms else None,
        }
        try:
            stream = await f.gateway.generate(prompt, params, request_id, body.cache_type, **slos,
                                              received_at=received_at, priority=body.priority)
        except Exception as err:  # noqa: BLE001 - every refusal is answered by its kind
            raise f.error(f.refused(err, engine_checked=True, param="prompt")) from err

        async def timed_out() -> None:
            await f.gateway.abort(request_id, reason="timeout")

        return request_id, Deadline(stream, f.request_timeout_s, on_timeout=timed_out)

    def usage(finals: list[dict[int, RequestOutput]]) -> dict:
        """Each prompt's tokens once, and every sample's tokens (best_of: those not returned too)."""
        prompt = sum(len(next(iter(samples.values())).prompt_token_ids) for samples in finals)
        completion = sum(len(out.token_ids) for samples in finals for out in samples.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def ended_in_error(output: RequestOutput | None) -> Failure | None:
        if output is not None and output.finish_reason != "error":
            return None
        log.warning("request ended with an engine error: %s", output.error if output is not None else "no output")
        return ENGINE_FAILED_REQUEST

    async def run(body, prompts: list[list[int]], chat: bool, received_at: float,  # noqa: ANN202 - JSON or a stream
                  given: Sequence[str | list[int]] = ("",)):
        """One engine request per prompt (a batch of completion prompts), each with `n` samples (`best_of`
        generated): choice `i * n + j` is sample j of prompt i, as vLLM numbers them."""
        f = front()
        started: list[Deadline] = []
        try:
            for prompt in prompts:
                request_id, stream = await start(body, prompt, received_at)
                started.append(stream)
        except BaseException:
            for stream in started:
                await stream.aclose()
            raise
        request_id = request_id if len(started) == 1 else f"cmpl-{uuid.uuid4().hex}"
        n = body.n
        generated = body.best_of or n
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            finals: list[dict[int, RequestOutput]] = [{} for _ in started]
            try:
                async for i, output in merged(started):
                    finals[i][output.index] = output
            except Exception as err:  # noqa: BLE001 - a timeout, or the engine failed under the request
                raise f.error(classify(err)) from err
            choices = []
            for i, samples in enumerate(finals):
                for output in samples.values():
                    if (failure := ended_in_error(output)) is not None:
                        raise f.error(failure)
                if len(samples) != generated:
                    raise f.error(ENGINE_FAILED_REQUEST)
                kept = kept_samples(samples, n)
                choices += [choice_for(body, i * n + j, given[i], f.tokenizer).final(out) for j, out in enumerate(kept)]
            return {"id": request_id, "object": kind, "created": int(time.time()), "model": f.model_name,
                    "choices": choices, "usage": usage(finals)}

        async def events() -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": request_id, "object": chunk_kind, "created": int(time.time()), "model": f.model_name}
            if chat:
                for index in range(len(started) * n):
                    first = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield f"data: {json.dumps(head | {'choices': [first]})}\n\n"
            finals: list[dict[int, RequestOutput]] = [{} for _ in started]
            choices: dict[tuple[int, int], Choice] = {}
            try:
                async for i, output in merged(started):
                    if (failure := ended_in_error(output)) is not None:
                        raise f.error(failure)
                    finals[i][output.index] = output
                    key = (i, output.index)
                    if key not in choices:
                        choices[key] = choice_for(body, i * n + output.index, given[i], f.tokenizer)
                    choice = choices[key].chunk(output)
                    if choice is not None:
                        yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
            except Exception as err:  # noqa: BLE001 - the status is sent already: an error event
                error = err if isinstance(err, OpenAIError) else f.error(classify(err))
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if body.stream_options and body.stream_options.include_usage and all(finals):
                yield f"data: {json.dumps(head | {'choices': [], 'usage': usage(finals)})}\n\n"
            yield "data: [DONE]\n\n"

        async def close_all() -> None:
            for stream in started:
                await stream.aclose()

        return ClosingStreamingResponse(events(), on_close=close_all, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):  # noqa: ANN202
        received_at = time.time()
        given = body.prompts
        prompts = [front().encode(p) if isinstance(p, str) else p for p in given]
        return await run(body, prompts, chat=False, received_at=received_at, given=given)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202
        received_at = time.time()
        prompt = front().tokenizer.apply_chat_template([m.for_template() for m in body.messages])
        return await run(body, [prompt], chat=True, received_at=received_at)

    add_token_routes(app, front)
    return app


def with_defaults(body: BodyT, defaults: dict[str, float | int], room: int) -> BodyT:
    """`body` with each sampling field the client left unset taken from `defaults` (the model's
    generation config), as vLLM does. Fields the request type lacks are skipped; a default
    `max_tokens` is cut to the `room` the prompt leaves (and skipped when a chat request set
    `max_completion_tokens`)."""
    given = body.model_fields_set
    unset = {name: value for name, value in defaults.items()
             if name in type(body).model_fields and name not in given}
    if "max_tokens" in unset:
        if "max_completion_tokens" in given or room < 1:
            del unset["max_tokens"]
        else:
            unset["max_tokens"] = min(int(unset["max_tokens"]), room)
    return body.model_copy(update=unset) if unset else body


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its request's stream however the response ends, even when the
    client left before the body started (then the body's generator never runs, and without this the
    request would run on as an orphan)."""

    def __init__(self, content: AsyncIterator[str], on_close, **kwargs: object) -> None:  # noqa: ANN001
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()
