"""Chaos on the product's shape, Ray Serve (tiny OPT, loopback): the bad-input tables over real HTTP and
gRPC (where Ray wraps every engine error), gRPC aborts and duplicate ids, 200 streams
with 50 cut, the listening sockets, and, last, the engine replica actor killed mid-stream.

docs/RELIABILITY.md records what these measured (the recovery time is printed by the last test).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import ray
from test_chaos_inputs import GRPC_TABLE, HTTP_TABLE, INTERNALS, g, run_http_table
from test_serve import MODEL, Server, serving

from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc
from cluster.ray_cluster import NAMESPACE

pytestmark = pytest.mark.timeout(600)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[Server]:
    with serving(tiny_opt_with_tokenizer, **{"server.replica_probe_interval_s": 0.5}) as running:
        yield running


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.AptServeStub]:
    with grpc.insecure_channel(server.grpc) as channel:
        yield pb_grpc.AptServeStub(channel)


def counter(server: Server, name: str, **labels: str) -> float:
    key = ",".join(f'{k}="{v}"' for k, v in sorted(({"model": MODEL, "replica": "0"} | labels).items()))
    return server.metrics().get(f"aptserve:{name}{{{key}}}", 0.0)


def test_every_listening_socket_is_on_loopback(server: Server) -> None:
    """Every socket the running app listens on (this process, Ray's services, Serve's proxy and
    replicas, the engine actor) is bound to loopback."""
    me = psutil.Process()
    listening = []
    for process in [me, *me.children(recursive=True)]:
        try:
            listening += [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    ports = {addr.port for _, addr in listening}
    assert server.config.server.port in ports and server.config.server.grpc_port in ports
    exposed = [(name, addr) for name, addr in listening if addr.ip not in LOOPBACK]
    assert not exposed, exposed


def test_bad_http_inputs_over_serve(server: Server) -> None:
    statuses = run_http_table(server.base, HTTP_TABLE)
    assert all(status < 500 for status in statuses.values()), statuses
    server.wait_idle()


def test_bad_grpc_inputs_over_serve(server: Server, stub: pb_grpc.AptServeStub) -> None:
    for name, request, expected in GRPC_TABLE:
        try:
            replies = list(stub.Generate(request, timeout=60))
            assert expected is None and replies[-1].finished, (name, "answered")
        except grpc.RpcError as err:
            assert err.code() == expected, (name, err.code(), err.details())
            assert "\n" not in err.details() and not INTERNALS.search(err.details()), (name, err.details())
        assert list(stub.Generate(g(max_tokens=2), timeout=60))[-1].finished, name
    server.wait_idle()


def test_grpc_abort_ends_the_stream_with_cancelled(server: Server, stub: pb_grpc.AptServeStub) -> None:
    stream = stub.Generate(g(max_tokens=400, ignore_eos=True, request_id="to-abort"), timeout=60)
    first = next(stream)
    assert first.request_id == "to-abort" and not first.finished
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    assert ended.value.code() == grpc.StatusCode.CANCELLED, ended.value.details()
    server.wait_idle()


def test_grpc_duplicate_request_id_is_refused_and_harms_nothing(server: Server, stub: pb_grpc.AptServeStub) -> None:
    first = stub.Generate(g(max_tokens=30, ignore_eos=True, request_id="twin"), timeout=60)
    head = next(first)
    with pytest.raises(grpc.RpcError) as twin:
        list(stub.Generate(g(max_tokens=3, request_id="twin"), timeout=60))
    assert twin.value.code() == grpc.StatusCode.ALREADY_EXISTS and "twin" in twin.value.details()
    assert not INTERNALS.search(twin.value.details())
    rest = list(first)
    assert rest[-1].finished and rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 30
    assert len(head.new_token_ids) + sum(len(r.new_token_ids) for r in rest) == 30
    server.wait_idle()


def test_two_hundred_streams_fifty_cut(server: Server) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events = 0
        async with client.stream("POST", f"{server.base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return "done"
                events += line.startswith("data: ")
                if i % 4 == 0 and events >= 2:
                    return "cut"  # leaving the block closes the connection mid-stream
        return "ended without [DONE]"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(200))))

    outcomes = asyncio.run(run())
    assert outcomes.count("done") == 150 and outcomes.count("cut") == 50, outcomes
    after = server.wait_idle()
    key = f'{{model="{MODEL}",replica="0"}}'
    assert after[f"aptserve:num_requests_running{key}"] == after[f"aptserve:num_requests_waiting{key}"] == 0
    assert after[f"aptserve:kv_cache_usage_perc{key}"] == after[f"aptserve:hidden_cache_usage_perc{key}"] == 0


def test_health_and_metrics_report_each_replica(server: Server) -> None:
    health = httpx.get(f"{server.base}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "replicas": {"0": "up"}}
    assert server.metrics()[f'aptserve:up{{model="{MODEL}",replica="0"}}'] == 1


def test_a_killed_engine_replica_comes_back_without_anyone_acting(server: Server) -> None:
    """The engine replica actor is killed mid-stream: the streams in flight end with an error status
    (HTTP error event, gRPC UNAVAILABLE) within the request timeout, requests get 503 + Retry-After
    while it is down, /health and /metrics say so, and once Ray has restarted it requests succeed."""
    timeout_s = server.config.server.request_timeout_s
    body = {"model": MODEL, "prompt": "Long story:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ended: dict[str, object] = {}

    def http_stream() -> None:
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=timeout_s) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        ended["http"] = events

    def grpc_stream() -> None:
        with grpc.insecure_channel(server.grpc) as channel:
            try:
                list(pb_grpc.AptServeStub(channel).Generate(g(max_tokens=400, ignore_eos=True), timeout=timeout_s))
                ended["grpc"] = "finished"
            except grpc.RpcError as err:
                ended["grpc"] = err.code()

    threads = [threading.Thread(target=http_stream), threading.Thread(target=grpc_stream)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while counter(server, "num_requests_running") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter(server, "num_requests_running") == 2
    engine = ray.get_actor("aptserve-engine-0", namespace=NAMESPACE)
    killed_at = time.monotonic()
    ray.kill(engine, no_restart=False)
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert ended["grpc"] == grpc.StatusCode.UNAVAILABLE
    events = ended["http"]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == 503, events[-2:]

    seen: set[int] = set()
    while True:  # bounded by the test's timeout
        response = httpx.post(f"{server.base}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "Hello again", "max_tokens": 3})
        seen.add(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.headers["retry-after"], response.text
        assert not INTERNALS.search(response.text), response.text
        health = httpx.get(f"{server.base}/health", timeout=30)
        assert health.status_code in (200, 503)
        if health.status_code == 503:
            assert health.json()["replicas"] == {"0": "down"}
            assert server.metrics()[f'aptserve:up{{model="{MODEL}",replica="0"}}'] == 0
        time.sleep(0.2)
    recovered_s = time.monotonic() - killed_at
    print(f"\nengine replica recovered {recovered_s:.1f} s after it was killed; statuses while down: {sorted(seen)}")
    assert httpx.get(f"{server.base}/health", timeout=30).json()["replicas"] == {"0": "up"}
    with grpc.insecure_channel(server.grpc) as channel:
        assert list(pb_grpc.AptServeStub(channel).Generate(g(max_tokens=2), timeout=60))[-1].finished
    server.wait_idle()
