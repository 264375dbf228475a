"""Direct ingress without Ray: the HTTP app and the gRPC service on the listeners an ingress replica
opens itself (`cluster/direct_ingress.py`), over one in-process engine (tiny OPT, SmolLM2 tokenizer)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from test_http_server import wait_idle

from cluster.config import load_config
from cluster.direct_ingress import DirectIngress, listening_socket
from cluster.engine_builder import build_async_engine
from cluster.gateways import LocalGateway
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc
from cluster.grpc_servicer import AptServeRpcs
from cluster.http_server import Frontend, build_app

MODEL = "tiny-opt"
KEY = "direct-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_taken(port: int) -> bool:
    try:
        listening_socket("127.0.0.1", port, share=False).close()
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def engine_and_frontend(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[object, Frontend]]:
    config = load_config(overrides={"model.path": str(tiny_opt_with_tokenizer), "cache.block_size": 4,
                                    "cache.num_blocks": 128, "server.served_model_name": MODEL})
    engine, tokenizer, name = build_async_engine(config)
    try:
        yield engine, Frontend(LocalGateway(engine), tokenizer, name, 60, api_key=KEY)
    finally:
        engine.shutdown()


@pytest.fixture
def frontend(engine_and_frontend: tuple[object, Frontend]) -> Frontend:
    return engine_and_frontend[1]


def start(frontend: Frontend, http_port: int, grpc_port: int, share: bool = False) -> DirectIngress:
    ingress = DirectIngress(build_app(frontend), AptServeRpcs(frontend), "127.0.0.1", http_port, grpc_port,
                            share_ports=share)
    ingress.start()
    return ingress


def test_http_and_grpc_answer_alike_and_errors_keep_their_status(frontend: Frontend) -> None:
    http_port, grpc_port = free_port(), free_port()
    ingress = start(frontend, http_port, grpc_port)
    try:
        assert ingress.alive()
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60).status_code == 401
        http = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, headers=auth, timeout=60).json()
        metadata = (("authorization", f"Bearer {KEY}"),)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.AptServeStub(channel)
            request = pb.GenerateRequest(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                         ignore_eos=True)
            replies = list(stub.Generate(request, metadata=metadata))
            assert stub.Health(pb.HealthRequest()).status == "ok"
            assert stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata).model == MODEL
            with pytest.raises(grpc.RpcError) as unauthenticated:
                stub.ModelInfo(pb.ModelInfoRequest())
            with pytest.raises(grpc.RpcError) as bad:
                list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt="x", temperature=-1), metadata=metadata))
            with pytest.raises(grpc.RpcError) as unknown:
                list(stub.Generate(pb.GenerateRequest(model="other", prompt="x"), metadata=metadata))
        assert "".join(r.text_delta for r in replies) == http["choices"][0]["text"]
        assert sum(len(r.new_token_ids) for r in replies) == 8 == http["usage"]["completion_tokens"]
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The status keeps the servicer's one-line detail, not grpc's "Unexpected <class ...>".
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "temperature" in bad.value.details() and "Unexpected" not in bad.value.details()
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "other" in unknown.value.details()
    finally:
        ingress.stop()
    assert not ingress.alive()
    assert not port_taken(http_port) and not port_taken(grpc_port)


def test_a_grpc_client_that_cancels_aborts_its_request(engine_and_frontend: tuple[object, Frontend]) -> None:
    """Unlike Serve's proxy (docs/RELIABILITY.md, "Known limits"), `grpc.aio` cancels the handler
    whenever the client cancels, so the request is aborted and its blocks freed at once."""
    engine, frontend = engine_and_frontend
    ingress = start(frontend, free_port(), free_port())
    aborted_before = engine.stats().metrics.request_success.get("abort", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ingress.grpc_port}") as channel:
            call = pb_grpc.AptServeStub(channel).Generate(
                pb.GenerateRequest(model=MODEL, prompt="x", max_tokens=480, ignore_eos=True),
                metadata=(("authorization", f"Bearer {KEY}"),))
            next(call)
            call.cancel()
        wait_idle(engine)
    finally:
        ingress.stop()
    metrics = engine.stats().metrics
    assert metrics.request_success.get("abort", 0) == aborted_before + 1


def test_a_taken_port_fails_the_start_and_leaves_nothing_listening(frontend: Frontend) -> None:
    http_port, grpc_port = free_port(), free_port()
    with listening_socket("127.0.0.1", grpc_port, share=False) as squatter:
        squatter.listen()
        with pytest.raises(RuntimeError):
            start(frontend, http_port, grpc_port)
    assert not port_taken(http_port)
    with listening_socket("127.0.0.1", http_port, share=False) as squatter:
        squatter.listen()
        with pytest.raises(OSError):
            start(frontend, http_port, grpc_port)
    assert not port_taken(grpc_port)


def test_ingress_replicas_on_one_node_share_the_ports(frontend: Frontend) -> None:
    http_port, grpc_port = free_port(), free_port()
    first = start(frontend, http_port, grpc_port, share=True)
    try:
        second = start(frontend, http_port, grpc_port, share=True)
        try:
            for _ in range(4):
                assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
        finally:
            second.stop()
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
    finally:
        first.stop()
