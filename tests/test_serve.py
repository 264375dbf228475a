"""The product's serving surface on Ray Serve (tiny OPT, SmolLM2 tokenizer): the official `openai`
client, gRPC against HTTP, 100 concurrent streams with 30 dropped, /metrics, and API fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, given, settings

from bench.serve_bench import wait_healthy
from cluster.config import AptServeConfig, load_config
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc
from cluster.metrics import METRICS
from cluster.ray_runtime import ensure_ray
from cluster.serve_app import start_serving, stop_serving

MODEL = "tiny-opt"
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, config: AptServeConfig) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{config.server.port}"
        self.grpc = f"127.0.0.1:{config.server.grpc_port}"

    def metrics(self) -> dict[str, float]:
        """Samples of this replica by name and labels: `name{k="v",...}` → value."""
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Until nothing runs or waits and no block is in use (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            labels = f'{{model="{MODEL}",replica="0"}}'
            busy = [samples[f"aptserve:{name}{labels}"] for name in
                    ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "hidden_cache_usage_perc")]
            if not any(busy) or time.monotonic() > deadline:
                assert not any(busy), f"not idle: running, waiting, kv, hidden = {busy}"
                return samples
            time.sleep(0.2)


@contextlib.contextmanager
def serving(model_dir: Path, **overrides: object) -> Iterator[Server]:
    """The product on Ray Serve over `model_dir` (tiny), on free loopback ports, until the block ends
    (then Ray too, if this started it: later tests expect no Ray)."""
    started_ray = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    config = load_config(overrides={
        "model.path": str(model_dir), "cache.block_size": 4, "cache.num_blocks": 256,
        "scheduler.cache_mode": "hybrid", "scheduler.policy": "apt", "scheduler.max_waiting": 200,
        "server.served_model_name": MODEL, "server.port": free_port(), "server.grpc_port": free_port(),
        "server.request_timeout_s": 60,
    } | overrides)
    server = Server(config)
    try:  # a server that never becomes healthy is shut down too: the next module starts Serve anew
        start_serving(config)
        wait_healthy(server.base, None, timeout_s=120)
        yield server
    finally:
        stop_serving(config)
        if started_ray:
            ray.shutdown()


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[Server]:
    with serving(tiny_opt_with_tokenizer) as running:
        yield running


def test_official_openai_client(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                               temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == plain.choices[0].text
    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n must be"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=0)
    two = client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == two.choices[1].text


def test_grpc_streams_what_http_returns(server: Server) -> None:
    prompt = "Once upon a time"
    http = httpx.post(f"{server.base}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}).json()
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.AptServeStub(channel)
        request = pb.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True)
        replies = list(stub.Generate(request))
        info = stub.ModelInfo(pb.ModelInfoRequest())
        assert stub.Health(pb.HealthRequest()).status == "ok"
        with pytest.raises(grpc.RpcError) as unknown:
            list(stub.Generate(pb.GenerateRequest(model="other", prompt="x")))
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt="x", temperature=-1)))
    assert "".join(r.text_delta for r in replies) == http["choices"][0]["text"]
    assert sum(len(r.new_token_ids) for r in replies) == 16 == http["usage"]["completion_tokens"]
    assert replies[-1].finished and replies[-1].finish_reason == "length"
    assert info.model == MODEL and info.max_model_len > 0
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in bad.value.details()


def test_hundred_streams_thirty_dropped(server: Server) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        dropping = i % 10 < 3
        # A stream to drop asks for many tokens, so that it is still running when the server sees the
        # disconnect (a short one can finish first on a fast step and be counted as finished).
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 300 if dropping else 24,
                "temperature": 0, "ignore_eos": True, "stream": True}
        events = 0
        async with client.stream("POST", f"{server.base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done"
                events += 1
                if dropping and events >= 3:
                    return "dropped"  # leaving the block closes the connection half-way
                assert json.loads(line[6:]).get("choices", [{}])[0].get("finish_reason", "?") in (None, "length"), line
        return "cut"

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(100))))

    before = server.metrics()
    outcomes = asyncio.run(run())
    assert outcomes.count("done") == 70 and outcomes.count("dropped") == 30
    after = server.wait_idle()
    labels = f'finished_reason="{{}}",model="{MODEL}",replica="0"'
    aborted = 'aptserve:request_success_total{' + labels.format("abort") + "}"
    finished = 'aptserve:request_success_total{' + labels.format("length") + "}"
    assert after[finished] - before.get(finished, 0) >= 70
    assert after[aborted] - before.get(aborted, 0) >= 30 - 3  # a dropped stream may finish first


def test_dropping_the_first_stream_leaves_the_others_running(server: Server) -> None:
    """Regression: the stream that started the ingress's output poller disconnects while another
    streams. Ray cancels the calls a cancelled request submitted; the poller must not be one of them."""
    def body(prompt: str, max_tokens: int) -> dict:
        return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}

    async def after_first_event(response: httpx.Response) -> AsyncIterator[str]:
        lines = (line async for line in response.aiter_lines() if line.startswith("data: "))
        await anext(lines)
        return lines

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{server.base}/v1/completions"
            first = await client.send(client.build_request("POST", url, json=body("First", 200)), stream=True)
            kept = await after_first_event(first)  # this request started the poller; keep it open
            second = await client.send(client.build_request("POST", url, json=body("Second", 40)), stream=True)
            rest = await after_first_event(second)
            await kept.aclose()
            await first.aclose()  # disconnect the first stream half-way
            try:
                return [line async for line in rest]
            finally:
                await second.aclose()

    server.wait_idle()
    time.sleep(1.5)  # longer than the ingress's poll timeout: the idle poller has ended
    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]", events[-2:]
    assert all("choices" in json.loads(line[6:]) for line in events[:-1]), events[-2]
    server.wait_idle()


def test_metrics_expose_every_name_and_move(server: Server) -> None:
    text = httpx.get(f"{server.base}/metrics", timeout=30).text
    for name in METRICS:
        assert f"# TYPE aptserve:{name} " in text, f"missing metric aptserve:{name}"
    before = server.metrics()
    httpx.post(f"{server.base}/v1/completions", timeout=60,
               json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
    after = server.wait_idle()
    key = f'{{model="{MODEL}",replica="0"}}'
    assert after[f"aptserve:generation_tokens_total{key}"] - before[f"aptserve:generation_tokens_total{key}"] == 5
    assert after[f"aptserve:time_to_first_token_seconds_count{key}"] > before[
        f"aptserve:time_to_first_token_seconds_count{key}"]
    assert after[f"aptserve:num_cache_blocks{key}"] == 256


def test_api_fuzz_never_fails_on_bad_input(server: Server) -> None:
    """schemathesis cases for every operation of the OpenAPI schema (25 each): no 5xx but a 503 from
    a full queue, and every error in a JSON body."""
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    seen: list[int] = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # noqa: ANN001 - a schemathesis case
            if isinstance(case.body, dict):  # keep generation short; any other field stays as generated
                tokens = case.body.get("max_tokens")
                if tokens is None or (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 8):
                    case.body["max_tokens"] = 8
            response = case.call(timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500 or response.status_code == 503, (
                case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert "error" in response.json()

        check()
    assert any(code == 400 for code in seen) and any(code == 200 for code in seen), sorted(set(seen))


def test_still_healthy_and_empty_after_fuzzing(server: Server) -> None:
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200
    server.wait_idle()


def test_app_builder_takes_deployment_arguments(tiny_opt_with_tokenizer: Path) -> None:
    """What a KubeRay serveConfigV2 passes (import path `cluster.serve_app:app_builder`)."""
    from cluster.serve_app import app_builder

    app = app_builder({"model": str(tiny_opt_with_tokenizer), "tensor_parallel_size": 2, "replicas": 3,
                       "policy": "apt", "cache_mode": "hybrid", "ttft_slo_s": 2.5, "tbt_slo_s": 0.2,
                       "set": {"server.max_ongoing_requests": 64}})
    config = AptServeConfig.model_validate(app._bound_deployment.init_args[0])
    assert config.parallel.tensor_parallel_size == 2 and config.parallel.executor == "ray"
    assert config.parallel.replicas == 3 and config.scheduler.policy == "apt"
    assert (config.scheduler.ttft_slo_s, config.scheduler.tbt_slo_s) == (2.5, 0.2)
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 64
    with pytest.raises(ValueError, match="unknown app_builder arguments: colour"):
        app_builder({"colour": "blue"})
