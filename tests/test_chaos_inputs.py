"""Chaos, bad inputs: every request below gets a 4xx in OpenAI's shape (gRPC: a status with a one-line
detail), never a 5xx or anything internal, and the next normal request succeeds.

The tables run here over the in-process server (uvicorn over one engine; the gRPC servicer with a
stand-in context), and over Ray Serve in tests/test_chaos_serve.py, where Ray wraps engine errors.
docs/RELIABILITY.md lists the inputs and the answers they got.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from test_http_server import COMPLETION, MODEL, running_server, wait_idle

from cluster.gateways import LocalGateway
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_servicer import GrpcRequestError, GrpcServicer
from cluster.http_server import Frontend, build_app
from cluster.tokenizer import Tokenizer
from hybrid_cache.plan import SamplingParams

pytestmark = pytest.mark.timeout(300)

# What no answer may hold: a traceback, a source path, a process or actor id of ours.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/work/|/site-packages/|pid=|ActorID|actor_id|ray::|RayTaskError")

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@dataclass(frozen=True)
class Bad:
    """A request body (JSON value, or raw bytes sent as application/json) and the statuses it may get."""

    name: str
    body: object
    status: tuple[int, ...] = (400,)
    says: str = ""  # a word the error message must hold (the field at fault)
    path: str = "/v1/completions"


def raw(text: str) -> bytes:
    return text.encode()


def base(**fields: object) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4} | fields


HTTP_TABLE: list[Bad] = [
    # Non-finite and extreme numbers, as raw JSON text (Python's json would refuse to write them).
    Bad("temperature NaN", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "temperature": NaN}}'), says="NaN"),
    Bad("temperature Infinity", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "temperature": Infinity}}')),
    Bad("temperature -Infinity", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "temperature": -Infinity}}')),
    Bad("top_p NaN", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "top_p": NaN}}')),
    Bad("temperature 1e309", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "temperature": 1e309}}'), says="1e309"),
    Bad("max_tokens 1e309", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 1e309}}')),
    Bad("ttft_slo_ms NaN", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "ttft_slo_ms": NaN}}')),
    Bad("temperature 1e-40 is greedy", base(temperature=1e-40), status=(200,)),
    Bad("temperature -1", base(temperature=-1), says="temperature"),
    Bad("temperature 1e300", base(temperature=1e300), status=(200, 400)),
    Bad("top_p 0", base(top_p=0), says="top_p"),
    Bad("top_p 1.5", base(top_p=1.5), says="top_p"),
    Bad("top_p 1e-40", base(top_p=1e-40), status=(200, 400)),
    Bad("top_k -2", base(top_k=-2), says="top_k"),
    Bad("top_k -1 is off", base(top_k=-1), status=(200,)),
    Bad("top_k 10**30", base(top_k=10**30), status=(200, 400)),
    Bad("seed 2**64", base(seed=2**64), says="seed"),
    Bad("seed 2**63", base(seed=2**63), says="seed"),
    Bad("seed -1", base(seed=-1), says="seed"),
    Bad("seed a string", base(seed="abc"), says="seed"),
    Bad("max_tokens -1", base(max_tokens=-1), says="max_tokens"),
    Bad("max_tokens 0", base(max_tokens=0), says="max_tokens"),
    Bad("max_tokens 10**30", base(max_tokens=10**30), says="max_tokens"),
    Bad("max_tokens 1.5", base(max_tokens=1.5), says="max_tokens"),
    Bad("a 5000-digit integer", raw(f'{{"model": "{MODEL}", "prompt": "Hi", "seed": {"9" * 5000}}}')),
    # Prompts.
    Bad("empty prompt", base(prompt=""), says="empty"),
    Bad("empty token list", base(prompt=[])),
    Bad("prompt past the context", base(prompt="hello " * 20000), says="context"),
    Bad("out-of-vocabulary token id", base(prompt=[10**9]), says="vocabulary"),
    Bad("negative token id", base(prompt=[-1]), says="vocabulary"),
    Bad("fractional token id", base(prompt=[1.5])),
    Bad("lone surrogate", raw(f'{{"model": "{MODEL}", "prompt": "a\\ud800b"}}'), says="surrogate"),
    Bad("lone surrogate in chat",
        raw(f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\udfff"}}]}}'),
        says="surrogate", path="/v1/chat/completions"),
    # Bodies that are not the JSON object we serve.
    Bad("invalid UTF-8", b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe\xfd"}', says="UTF-8"),
    Bad("malformed JSON", raw("{not json"), says="JSON"),
    Bad("a JSON array", []),
    Bad("JSON null", raw("null")),
    Bad("deeply nested JSON", raw("[" * 100_000 + "]" * 100_000)),
    Bad("oversize body", raw(json.dumps(base(prompt="x" * (5 << 20)))), status=(413,)),
    # Wrong types and missing fields.
    Bad("no model", {"prompt": "Hi"}, says="model"),
    Bad("model a number", base(model=123), says="model"),
    Bad("unknown model", base(model="other"), status=(404,), says="does not exist"),
    Bad("no prompt", {"model": MODEL}, says="prompt"),
    Bad("stop an empty string", base(stop=""), says="stop"),
    Bad("stop a number list", base(stop=[1]), says="stop"),
    Bad("stop_token_ids out of vocabulary", base(stop_token_ids=[10**9]), says="stop_token_ids"),
    Bad("stop_token_ids negative", base(stop_token_ids=[-5]), says="stop_token_ids"),
    Bad("stop_token_ids a string", base(stop_token_ids="x"), says="stop_token_ids"),
    Bad("ignore_eos a word", base(ignore_eos="maybe"), says="ignore_eos"),
    Bad("stream a list", base(stream=[1]), says="stream"),
    Bad("cache_type unknown", base(cache_type="disk"), says="cache_type"),
    Bad("ttft_slo_ms negative", base(ttft_slo_ms=-1), says="ttft_slo_ms"),
    Bad("chat without messages", {"model": MODEL, "messages": []}, path="/v1/chat/completions"),
    Bad("chat role tool", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
        path="/v1/chat/completions", says="role"),
    # Fields that would change the output and are not implemented: refused, named.
    # Sampling fields out of range: refused, named.
    Bad("logprobs over 20", base(logprobs=21), says="logprobs"),
    Bad("chat top_logprobs without logprobs", CHAT | {"top_logprobs": 3}, says="top_logprobs",
        path="/v1/chat/completions"),
    Bad("echo a list", base(echo=[1]), says="echo"),
    Bad("presence_penalty over 2", base(presence_penalty=2.5), says="presence_penalty"),
    Bad("frequency_penalty under -2", base(frequency_penalty=-3), says="frequency_penalty"),
    Bad("repetition_penalty zero", base(repetition_penalty=0), says="repetition_penalty"),
    Bad("logit_bias a word key", base(logit_bias={"five": 10}), says="logit_bias"),
    Bad("logit_bias out of vocabulary", base(logit_bias={"1000000000": 1}), says="logit_bias"),
    Bad("min_p over 1", base(min_p=1.1), says="min_p"),
    Bad("min_tokens over max_tokens", base(min_tokens=50), says="min_tokens"),
    Bad("chat content an image", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, path="/v1/chat/completions", says="messages"),
    Bad("response_format", CHAT | {"response_format": {"type": "json_object"}}, says="response_format",
        path="/v1/chat/completions"),
    Bad("tools", CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, says="tools",
        path="/v1/chat/completions"),
    Bad("suffix", base(suffix="end"), says="suffix"),
    Bad("guided_json", base(guided_json={"type": "object"}), says="guided_json"),
    Bad("n 0", base(n=0), says="n must be"),
    Bad("n over the limit", base(n=1000), says="n must be"),
    Bad("best_of under n", base(n=3, best_of=2), says="best_of"),
    Bad("best_of streamed", base(n=1, best_of=2, stream=True), says="best_of"),
    # Accepted: fields that change nothing, "off" values stock clients send, and unknown fields.
    Bad("off values of sampling fields", base(presence_penalty=0, frequency_penalty=0.0, logit_bias=None,
                                              logprobs=None, echo=False, n=1), status=(200,)),
    Bad("harmless fields", base(user="u-1", metadata={"k": "v"}, store=False), status=(200,)),
    Bad("unknown field", base(colour="blue"), status=(200,)),
]


def send(client: httpx.Client, case: Bad) -> httpx.Response:
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    return client.post(case.path, content=content, headers={"content-type": "application/json"})


def check_answer(case: Bad, response: httpx.Response) -> None:
    assert response.status_code in case.status, (case.name, response.status_code, response.text[:300])
    assert not INTERNALS.search(response.text), (case.name, response.text[:600])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (case.name, error)
        assert error["code"] == response.status_code and error["type"] and "\n" not in error["message"]
        assert case.says.lower() in error["message"].lower() + str(error["param"]).lower(), (case.name, error)
        if response.status_code == 503:
            assert response.headers["retry-after"]


def run_http_table(base_url: str, cases: list[Bad]) -> dict[str, int]:
    """Each bad request, then a normal one that must succeed; returns each case's status."""
    statuses = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for case in cases:
            response = send(client, case)
            check_answer(case, response)
            statuses[case.name] = response.status_code
            normal = client.post("/v1/completions", json=COMPLETION | {"max_tokens": 2})
            assert normal.status_code == 200, (case.name, normal.text[:300])
    return statuses


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[str, object]]:
    with running_server(tiny_opt_with_tokenizer) as running:
        yield running


def test_the_table_is_large_enough() -> None:
    assert len(HTTP_TABLE) >= 40 and len({c.name for c in HTTP_TABLE}) == len(HTTP_TABLE)
    assert len(GRPC_TABLE) >= 15 and len({name for name, *_ in GRPC_TABLE}) == len(GRPC_TABLE)


def test_bad_http_inputs_get_4xx_and_change_nothing(server) -> None:
    base_url, engine = server
    run_http_table(base_url, HTTP_TABLE)
    wait_idle(engine)
    assert engine.healthy


def test_ingress_rejections_are_counted_once(server) -> None:
    """Refused by the ingress (a body error, an unknown model, an unsupported field): counted under
    replica="ingress"; refused by the engine (out-of-vocabulary id): counted by the engine only."""
    base_url, engine = server

    def counts() -> dict[str, float]:
        page = httpx.get(f"{base_url}/metrics").text
        found = re.findall(r'aptserve:requests_rejected_total\{model="[^"]+",reason="(\w+)",replica="(\w+)"\} (\S+)',
                           page)
        return {f"{replica}/{reason}": float(value) for reason, replica, value in found}

    before = counts()
    cases = [Bad("nan", HTTP_TABLE[0].body), Bad("model", base(model="other"), (404,)),
             Bad("logprobs", base(logprobs=21)), Bad("vocab", base(prompt=[10**9]))]
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for case in cases:
            assert send(client, case).status_code in case.status
    after = counts()
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert moved == {"ingress/invalid": 2, "ingress/not_found": 1, "0/invalid": 1}, moved


def frontend_for(engine, model_dir: Path, timeout_s: float = 60.0) -> Frontend:  # noqa: ANN001 - an AsyncEngine
    """Another front end over the same engine (any event loop can drive an AsyncEngine)."""
    return Frontend(LocalGateway(engine), Tokenizer(model_dir), MODEL, timeout_s)


async def post_then_disconnect(app, body: bytes) -> None:  # noqa: ANN001 - an ASGI app
    """POST `body` to the app, the client gone as soon as the app waits for it."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(_: dict) -> None:
        return None

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)


def test_a_stream_dropped_before_its_body_starts_is_aborted(server, tiny_opt_with_tokenizer: Path) -> None:
    """The client is gone before the response body starts: the request is aborted, not run to its end."""
    _, engine = server
    app = build_app(frontend_for(engine, tiny_opt_with_tokenizer))
    before = dict(engine.stats().metrics.request_success)
    asyncio.run(post_then_disconnect(app, json.dumps(COMPLETION | {"max_tokens": 400, "stream": True}).encode()))
    wait_idle(engine)
    after = engine.stats().metrics.request_success
    assert after.get("abort", 0) - before.get("abort", 0) == 1
    assert after.get("length", 0) == before.get("length", 0)


def test_a_stream_never_read_is_aborted(server) -> None:
    """A gateway stream closed before anything read it aborts its request and frees its blocks."""
    _, engine = server
    gateway = LocalGateway(engine)
    before = dict(engine.stats().metrics.request_success)

    async def drop() -> None:
        stream = await gateway.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), "dropped")
        await stream.aclose()
        again = await gateway.generate([5, 6, 7], SamplingParams(max_tokens=2), "dropped")  # the id is free again
        assert [o async for o in again][-1].finished

    asyncio.run(drop())
    wait_idle(engine)
    after = engine.stats().metrics.request_success
    assert after.get("abort", 0) - before.get("abort", 0) == 1 and after.get("length", 0) - before.get("length", 0) == 1


# -- gRPC: the servicer the Serve ingress forwards to, with a stand-in context ------------------------

def g(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**({"model": MODEL, "prompt": "Hello", "max_tokens": 4} | fields))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
GRPC_TABLE: list[tuple[str, pb.GenerateRequest, grpc.StatusCode | None]] = [
    ("temperature NaN", g(temperature=float("nan")), INVALID),
    ("temperature inf", g(temperature=float("inf")), INVALID),
    ("temperature -1", g(temperature=-1), INVALID),
    ("temperature 1e-40 is greedy", g(temperature=1e-40), None),
    ("top_p NaN", g(top_p=float("nan")), INVALID),
    ("top_p 0", g(top_p=0), INVALID),
    ("top_p 2", g(top_p=2), INVALID),
    ("top_k -2", g(top_k=-2), INVALID),
    ("seed -1", g(seed=-1), INVALID),
    ("max_tokens -1", g(max_tokens=-1), INVALID),
    ("max_tokens 0", g(max_tokens=0), INVALID),
    ("max_tokens past the context", g(max_tokens=2**31 - 1), INVALID),
    ("no prompt", g(prompt=""), INVALID),
    ("prompt and ids", g(prompt_token_ids=[5]), INVALID),
    ("out-of-vocabulary id", g(prompt="", prompt_token_ids=[2**31 - 1]), INVALID),
    ("negative id", g(prompt="", prompt_token_ids=[-1]), INVALID),
    ("prompt past the context", g(prompt="hello " * 20000), INVALID),
    ("unknown model", g(model="other"), grpc.StatusCode.NOT_FOUND),
    ("cache_type unknown", g(cache_type="disk"), INVALID),
    ("ttft_slo_ms NaN", g(ttft_slo_ms=float("nan")), INVALID),
    ("ttft_slo_ms -1", g(ttft_slo_ms=-1), INVALID),
    ("stop an empty string", g(stop=[""]), INVALID),
]


class Context:
    """A stand-in for the RPC context: records the status the servicer sets."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


async def call(servicer: GrpcServicer, request: pb.GenerateRequest) -> tuple[list[pb.GenerateResponse], Context]:
    context, replies = Context(), []
    try:
        async for reply in servicer.generate(request, context):
            replies.append(reply)
    except GrpcRequestError:
        assert context.code is not None
    return replies, context


def check_status(name: str, expected: grpc.StatusCode | None, replies: list, context: Context) -> None:
    if expected is None:
        assert context.code is None and replies and replies[-1].finished, (name, context.code, context.details)
        return
    assert context.code == expected, (name, context.code, context.details)
    assert context.details and "\n" not in context.details and not INTERNALS.search(context.details), context.details


def test_bad_grpc_inputs_get_a_status_and_change_nothing(server, tiny_opt_with_tokenizer: Path) -> None:
    _, engine = server
    servicer = GrpcServicer(frontend_for(engine, tiny_opt_with_tokenizer))

    async def run() -> None:
        for name, request, expected in GRPC_TABLE:
            check_status(name, expected, *await call(servicer, request))
            replies, context = await call(servicer, g(max_tokens=2))
            assert context.code is None and replies[-1].finished, (name, context.details)

    asyncio.run(run())
    wait_idle(engine)
