"""Direct ingress: an ingress replica's own HTTP and gRPC listeners, so requests skip Ray Serve's proxy.

Behind Serve's proxy every streamed token crosses two Ray calls (replica → proxy actor → client); at 16
streams on a 2-core host that work took CPU from the model, and direct ingress cut the served time
between tokens by about a fifth (docs/DEPLOY.md, "Ingress"; the runs are in docs/BENCHMARKS.md).
With `server.ingress: direct` each ingress replica serves the same FastAPI app under uvicorn and the
same gRPC servicer under `grpc.aio`, on `server.host`, in a thread of its own with its own event loop;
Serve still places, health-checks and restarts the replica. Several ingress replicas on one node share
the ports (SO_REUSEPORT; the kernel spreads connections); a single one binds them exclusively, so a
leftover server on the port is an error, not a silent split.

Nothing here imports Ray: the listeners are tested over an in-process engine.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Future
from typing import TypeVar

import grpc
import uvicorn
from fastapi import FastAPI

from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc
from cluster.grpc_servicer import AptServeRpcs, GrpcRequestError

Reply = TypeVar("Reply")


class DirectGrpcService(pb_grpc.AptServeServicer):
    """`AptServeRpcs` for `grpc.aio`: it ends a failed RPC with `context.abort`, which keeps the status's
    one-line detail (a raised exception would be reported as "Unexpected <class ...>")."""

    def __init__(self, rpcs: AptServeRpcs) -> None:
        self.rpcs = rpcs

    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for reply in self.rpcs.Generate(request, context):
                yield reply
        except GrpcRequestError:
            await context.abort(context.code(), context.details())

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:  # noqa: N802
        return await _unary(self.rpcs.Abort(request, context), context)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:  # noqa: N802
        return await self.rpcs.Health(request)

    async def ModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return await _unary(self.rpcs.ModelInfo(request, context), context)


async def _unary(call: Awaitable[Reply], context: grpc.aio.ServicerContext) -> Reply:
    try:
        return await call
    except GrpcRequestError:
        await context.abort(context.code(), context.details())
        raise  # not reached: abort raises


def listening_socket(host: str, port: int, share: bool) -> socket.socket:
    """A TCP socket bound to `host:port` (SO_REUSEPORT when `share`); binding errors raise here."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may find TIME_WAIT connections
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class DirectIngress:
    """HTTP (uvicorn over `app`) and gRPC (`servicer`) on `host`, served by one background thread.

    `start` returns once both listen, or raises what stopped them; `alive` says whether they still
    serve (the replica's health check); `stop` closes both, letting open streams end for `grace_s`.
    """

    def __init__(self, app: FastAPI, rpcs: AptServeRpcs, host: str, http_port: int, grpc_port: int,
                 share_ports: bool = False, max_ongoing_requests: int | None = None) -> None:
        self.host, self.http_port, self.grpc_port, self.share_ports = host, http_port, grpc_port, share_ports
        self._servicer = DirectGrpcService(rpcs)
        # Beyond `max_ongoing_requests` open HTTP requests uvicorn answers 503, as Serve's limit would.
        self._http = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                   limit_concurrency=max_ongoing_requests))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc: grpc.aio.Server | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        sock = listening_socket(self.host, self.http_port, self.share_ports)
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), name="aptserve-direct-ingress",
                                        daemon=True)
        self._thread.start()
        ready.result(timeout=timeout_s)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._http.should_exit

    def stop(self, grace_s: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        self._http.should_exit = True
        if self._grpc is not None:
            asyncio.run_coroutine_threadsafe(self._grpc.stop(grace_s), loop)
        thread.join(timeout=grace_s + 5)

    def _run(self, sock: socket.socket, ready: Future[None]) -> None:
        asyncio.run(self._serve(sock, ready))

    async def _serve(self, sock: socket.socket, ready: Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", int(self.share_ports))])
            pb_grpc.add_AptServeServicer_to_server(self._servicer, self._grpc)
            address = f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"
            self._grpc.add_insecure_port(address)  # raises when the port is taken
            await self._grpc.start()
            serving = asyncio.ensure_future(self._http.serve(sockets=[sock]))
            while not self._http.started and not serving.done():
                await asyncio.sleep(0.01)
            if serving.done():
                serving.result()  # uvicorn stopped before it listened: raise why
                raise RuntimeError("the HTTP listener stopped while starting")
        except BaseException as err:
            sock.close()
            if self._grpc is not None:
                await self._grpc.stop(None)
            ready.set_exception(err)
            return
        ready.set_result(None)
        try:
            await serving
        finally:
            await self._grpc.stop(None)
