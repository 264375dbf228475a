"""Chaos, faults under the front ends (in-process, no Ray Serve): a stopped engine, a request past its
deadline, an unexpected exception, and Ray's wrapped errors. Each is answered with a status and a short
message, never a traceback, and monitoring sees the stopped engine instead of its last numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from ray.exceptions import RayTaskError
from test_chaos_inputs import INTERNALS, Context, call, frontend_for, g
from test_http_server import COMPLETION, MODEL, running_server, wait_idle

from cluster.errors import Kind, classify
from cluster.grpc_servicer import GrpcServicer
from cluster.http_server import Frontend, build_app
from cluster.tokenizer import Tokenizer
from scheduler_service.engine import QueueFull

pytestmark = pytest.mark.timeout(300)


def test_a_stopped_engine_answers_503_and_shows_in_health_and_metrics(tiny_opt_with_tokenizer: Path) -> None:
    with running_server(tiny_opt_with_tokenizer) as (base, engine):
        assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
        engine.shutdown()  # its loop stops: as if it had died
        response = httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "server_error" and not INTERNALS.search(response.text)
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "replicas": {"0": "down"}}
        page = httpx.get(f"{base}/metrics", timeout=10).text
        assert f'aptserve:up{{model="{MODEL}",replica="0"}} 0.0' in page
        assert 'replica="0"' not in page.replace(f'aptserve:up{{model="{MODEL}",replica="0"}}', ""), page
        rejected = f'aptserve:requests_rejected_total{{model="{MODEL}",reason="unavailable",replica="ingress"}} 1.0'
        assert rejected in page, page


def test_grpc_request_past_its_deadline_is_aborted(tiny_opt_with_tokenizer: Path) -> None:
    with running_server(tiny_opt_with_tokenizer) as (_, engine):
        servicer = GrpcServicer(frontend_for(engine, tiny_opt_with_tokenizer, timeout_s=0.3))
        replies, context = asyncio.run(call(servicer, g(max_tokens=480, ignore_eos=True)))
        assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.3 s" in context.details
        assert not replies or not replies[-1].finished
        wait_idle(engine)
        metrics = engine.stats().metrics
        assert metrics.request_success.get("abort", 0) == 1 and metrics.aborted == {"timeout": 1}


def test_a_grpc_call_cancelled_by_its_client_aborts_its_request(tiny_opt_with_tokenizer: Path) -> None:
    """What Serve does when a gRPC client cancels (`call.cancel()`): it cancels the task iterating
    `Generate`. (Behind Serve's proxy, `server.ingress: proxy`, the cancel is missed when it comes while
    the proxy writes to the client, see docs/RELIABILITY.md; the request then ends at max_tokens or at
    the request timeout.)"""
    with running_server(tiny_opt_with_tokenizer) as (_, engine):
        servicer = GrpcServicer(frontend_for(engine, tiny_opt_with_tokenizer))

        async def cancel_after_first_reply() -> None:
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in servicer.generate(g(max_tokens=480, ignore_eos=True), Context()):
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_after_first_reply())
        wait_idle(engine)
        metrics = engine.stats().metrics
        assert metrics.aborted == {"client": 1} and metrics.request_success.get("length", 0) == 0


class Exploding:
    """A gateway whose engine raises something no one expected, holding internals in its message."""

    max_model_len, vocab_size, num_replicas = 64, 100, 1

    async def generate(self, prompt: Sequence[int], *_: object, **__: object) -> object:
        raise RuntimeError('Traceback: File "/srv/aptserve/cluster/secret.py", line 1, pid=4242')


def test_an_unexpected_exception_is_a_generic_500_and_internal(tiny_opt_with_tokenizer: Path) -> None:
    frontend = Frontend(Exploding(), Tokenizer(tiny_opt_with_tokenizer), MODEL, 60.0)  # type: ignore[arg-type]

    async def run() -> tuple[httpx.Response, Context]:
        transport = httpx.ASGITransport(app=build_app(frontend))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/completions", json=COMPLETION)
        _, context = await call(GrpcServicer(frontend), g())
        return response, context

    response, context = asyncio.run(run())
    assert response.status_code == 500 and response.json()["error"]["message"] == "internal server error"
    assert context.code == grpc.StatusCode.INTERNAL and context.details == "internal server error"


def wrapped(cause: Exception) -> Exception:
    """What an actor's exception looks like to its caller: the cause's class, with Ray's traceback as text."""
    traceback = ('Traceback (most recent call last):\n  File "/work/main/scheduler_service/engine.py", line 9\n'
                 f"{type(cause).__name__}: {cause}")
    return RayTaskError("EngineService.add_request", traceback, cause, proctitle="ray::EngineService",
                        pid=4242, ip="127.0.0.1", actor_id="8c783588c0d5e6a600daafc601000000").as_instanceof_cause()


@pytest.mark.parametrize(("cause", "kind", "says"), [
    (ValueError("the prompt is empty: give at least one token"), Kind.INVALID, "the prompt is empty"),
    (QueueFull("the waiting queue is full (4096 requests): retry later"), Kind.OVERLOADED, "queue is full"),
    (ValueError("request id 'twin' is already in use"), Kind.INVALID, "already in use"),
])
def test_ray_wrapped_errors_are_answered_with_their_cause_only(cause: Exception, kind: Kind, says: str) -> None:
    err = wrapped(cause)
    assert "pid=4242" in str(err) and "engine.py" in str(err)  # what an answer of str(err) would leak
    failure = classify(err)
    assert failure.kind is kind and says in failure.message
    assert not INTERNALS.search(failure.message) and "\n" not in failure.message
