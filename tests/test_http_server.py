"""The OpenAI-compatible HTTP API over a real uvicorn server on 127.0.0.1 (tiny OPT, SmolLM2 tokenizer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from cluster.config import load_config
from cluster.engine_builder import build_async_engine
from cluster.gateways import LocalGateway
from cluster.http_server import Frontend, build_app

MODEL = "tiny-opt"


@contextlib.contextmanager
def running_server(model: Path, gateway: type[LocalGateway] = LocalGateway, frontend_options: dict | None = None,
                   **overrides: object) -> Iterator[tuple[str, object]]:
    """The HTTP app over one in-process engine, served by uvicorn on a free loopback port
    (`frontend_options`: more `Frontend` fields, such as `api_key`)."""
    config = load_config(overrides={
        "model.path": str(model), "cache.block_size": 4, "cache.num_blocks": 512,
        "scheduler.cache_mode": "hybrid", "server.served_model_name": MODEL,
    } | overrides)
    engine, tokenizer, name = build_async_engine(config)
    frontend = Frontend(gateway(engine), tokenizer, name, config.server.request_timeout_s, **(frontend_options or {}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(frontend), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[str, object]]:
    with running_server(tiny_opt_with_tokenizer) as running:
        yield running


def wait_idle(engine, timeout: float = 10.0) -> None:
    """The engine ends every request and frees every block (bounded wait: the loop runs on a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.cache.num_free == stats.cache.num_blocks:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def sse(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
              "ignore_eos": True, "ttft_slo_ms": 2000, "tbt_slo_ms": 500}


def test_completion_stream_equals_non_stream(server) -> None:
    base, engine = server
    plain = httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 12
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                      json=COMPLETION | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == plain["usage"] and events[-2]["choices"] == []
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == plain["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    wait_idle(engine)


def test_chat_completion(server) -> None:
    base, engine = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    plain = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        events = sse(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == plain["choices"][0]["message"]["content"]
    wait_idle(engine)


def test_models_and_health(server) -> None:
    base, _ = server
    assert httpx.get(f"{base}/health").status_code == 200
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "other", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n must be"),
        ({"model": MODEL, "prompt": "hi", "n": 2, "best_of": 1}, 400, "best_of"),
        ({"model": MODEL, "prompt": ""}, 400, "empty"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": [1] * 3000}, 400, "context"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "vocabulary"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "cache_type": "disk"}, 400, "cache_type"),
        ({"model": MODEL, "prompt": "hi", "ttft_slo_ms": -5}, 400, "ttft_slo_ms"),
        ({"model": MODEL}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body: dict, status: int, message: str) -> None:
    base, engine = server
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status and error["type"]
    wait_idle(engine)


def test_malformed_json(server) -> None:
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_disconnect_aborts_and_frees_blocks(server) -> None:
    base, engine = server
    body = COMPLETION | {"max_tokens": 400, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in seen)
    wait_idle(engine)
    # The server still serves.
    assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
    wait_idle(engine)


def test_full_queue_answers_503_with_retry_after(tiny_opt_with_tokenizer: Path) -> None:
    # Room for one request at a time and two waiting: a burst of 12 overflows the queue.
    with running_server(tiny_opt_with_tokenizer, **{"cache.num_blocks": 16, "scheduler.max_waiting": 2}) as (
        base, engine
    ):
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = COMPLETION | {"max_tokens": 30, "ignore_eos": True}
                return list(await asyncio.gather(*(client.post(f"{base}/v1/completions", json=body)
                                                   for _ in range(12))))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
        for rejected in (r for r in responses if r.status_code == 503):
            assert rejected.headers["retry-after"] == "1"
            assert rejected.json()["error"]["type"] == "overloaded_error"
        wait_idle(engine)
        assert engine.stats().num_rejected["queue_full"] == codes.count(503)


def test_request_timeout_aborts(tiny_opt_with_tokenizer: Path) -> None:
    with running_server(tiny_opt_with_tokenizer, **{"server.request_timeout_s": 0.3}) as (base, engine):
        long = COMPLETION | {"max_tokens": 480, "ignore_eos": True}
        response = httpx.post(f"{base}/v1/completions", json=long, timeout=60)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", f"{base}/v1/completions", json=long | {"stream": True}, timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == 504
        wait_idle(engine)
        assert engine.stats().metrics.request_success.get("abort", 0) == 2
        assert engine.stats().metrics.aborted == {"timeout": 2}  # a timeout is counted as one (an SLO miss)


class Recording(LocalGateway):
    """The in-process gateway, recording when the front end says it received each request."""

    received: list[float] = []

    async def generate(self, *args: object, received_at: float | None = None, **kwargs: object):  # noqa: ANN201
        self.received.append(received_at)
        return await super().generate(*args, received_at=received_at, **kwargs)


def test_ttft_counts_from_the_ingress_receipt(tiny_opt_with_tokenizer: Path) -> None:
    """The front end passes the time it received the request, so the engine's TTFT starts there."""
    with running_server(tiny_opt_with_tokenizer, gateway=Recording) as (base, engine):
        sent = time.time()
        assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
        answered = time.time()
        [received] = Recording.received
        assert sent <= received <= answered


def test_metrics_export_the_step_time_model_and_its_error(server) -> None:
    """apt sizes prompt chunks by the start-up step-time model: /metrics shows it and how far off it was."""
    base, engine = server
    assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
    wait_idle(engine)
    report = engine.engine.stats().step_time
    assert report.model is not None and report.num_steps > 0 and report.measured_seconds > 0
    page = httpx.get(f"{base}/metrics", timeout=10).text
    series = {}
    for line in page.splitlines():
        if line.startswith("aptserve:step_time"):
            name, value = line.rsplit(" ", 1)
            term = re.search(r'term="(\w+)"', name)
            series[name.split("{")[0] + (f"/{term.group(1)}" if term else "")] = float(value)
    model = "aptserve:step_time_model_seconds"
    assert {f"{model}/{t}" for t in ("intercept", "per_token", "per_context", "per_sequence")} <= set(series)
    assert series[f"{model}/per_token"] == pytest.approx(report.model.seconds_per_token)
    assert series["aptserve:step_time_measured_seconds_total"] == pytest.approx(report.measured_seconds)
    assert series["aptserve:step_time_predicted_seconds_total"] == pytest.approx(report.predicted_seconds)
    assert series["aptserve:step_time_median_rel_error"] == pytest.approx(report.median_rel_error)
