"""The engine in a process of its own, reached over a Unix socket (`server.runtime: process`).

The child process runs an `EngineService` (the same scheduler service a Ray engine replica hosts) and
answers its calls — `add_request`, `poll`, `abort`, `stats`, `health`, `model_info` — on a socket in a
private directory. The parent reaches it through `EngineConnection`, whose `<call>.remote(...)` returns
an awaitable as a Ray actor handle's does, so the same `EngineClient` and `ReplicaRouter` serve both
runtimes. Why a process: the HTTP and gRPC front end (request parsing, streaming, JSON) then never
holds the interpreter lock the engine's step needs between kernels (docs/DEPLOY.md, "Runtime").

Nothing outlives the parent: the child stops when its control pipe closes (the parent stopped or
died), and exits when its engine loop stops, so that the parent sees it gone and exits in turn.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import multiprocessing
import pickle
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Awaitable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cluster.config import AptServeConfig
from cluster.errors import ReplicaFailed

log = logging.getLogger(__name__)

CALLS = frozenset({"add_request", "poll", "abort", "stats", "health", "model_info"})
_LENGTH = struct.Struct("!I")


class EngineProcessError(ReplicaFailed):
    """The engine process failed to start, or its connection was lost."""


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:  # noqa: ANN401 - whatever was sent
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))  # noqa: S301 - our own child, over a private socket


# -- the child's side --------------------------------------------------------------------------------
async def serve_connection(service: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer `(call id, name, args, kwargs)` frames with `(call id, ok, value or exception)` frames,
    each call in a task of its own (a long `poll` must not hold up an `add_request`), until EOF."""
    tasks: set[asyncio.Task] = set()

    async def answer(call_id: int, name: str, args: tuple, kwargs: dict) -> None:
        try:
            if name not in CALLS:
                raise AttributeError(f"the engine process has no call {name!r}")
            reply = (call_id, True, await getattr(service, name)(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - the caller gets the engine's own error
            reply = (call_id, False, err)
        try:
            frame = _frame(reply)
        except Exception as err:  # noqa: BLE001 - an unpicklable value or exception still ends the call
            frame = _frame((call_id, False, RuntimeError(f"{name}: {reply[2]!r} (not sendable: {err})")))
        if not writer.is_closing():
            writer.write(frame)

    try:
        while True:
            try:
                call_id, name, args, kwargs = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.CancelledError:  # the process is stopping; asyncio's stream callback
                return  # would report a handler that ends cancelled as an error
            task = asyncio.get_running_loop().create_task(answer(call_id, name, args, kwargs))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()


def _build_engine(config: AptServeConfig):  # noqa: ANN202 - an Engine; imported here, in the child only
    from cluster.engine_builder import build_engine

    return build_engine(config)[0]


def run_engine_process(config: dict, address: str, control: Connection) -> None:
    """The child's entry point: build the engine, say so on `control` (`("ready", model info)` or
    `("failed", message)`), then serve `address` until `control` closes or the engine loop stops."""
    from scheduler_service.engine_service import EngineService

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent too, which stops this process
    typed = AptServeConfig.model_validate(config)
    try:
        service = EngineService(_build_engine, typed)
    except BaseException as err:
        control.send(("failed", f"{type(err).__name__}: {err}"))
        raise
    try:
        asyncio.run(_serve(service, address, control, typed.server.replica_probe_interval_s))
    finally:
        service.engine.shutdown()
    if not service.engine.healthy:
        raise SystemExit(1)


async def _serve(service, address: str, control: Connection, check_interval_s: float) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def watch_control() -> None:  # blocks on the pipe; any message or EOF means stop
        try:
            control.recv()
        except (EOFError, OSError):
            pass
        loop.call_soon_threadsafe(closed.set)

    server = await asyncio.start_unix_server(lambda r, w: serve_connection(service, r, w), path=address)
    control.send(("ready", await service.model_info()))
    threading.Thread(target=watch_control, name="aptserve-engine-control", daemon=True).start()
    async with server:
        while not closed.is_set() and service.engine.healthy:
            try:
                await asyncio.wait_for(closed.wait(), check_interval_s)
            except TimeoutError:
                pass
    if not service.engine.healthy:
        log.error("the engine loop stopped: the engine process exits")


# -- the parent's side -------------------------------------------------------------------------------
class _Call:
    def __init__(self, connection: EngineConnection, name: str) -> None:
        self._connection, self._name = connection, name

    def remote(self, *args: object, **kwargs: object) -> Awaitable[Any]:
        return self._connection.call(self._name, args, kwargs)


class EngineConnection:
    """Calls into the engine process, from one event loop (the first that calls): `conn.poll.remote(...)`
    sends the call at once and returns a future of its answer; the engine's exceptions are raised as
    they are. A lost connection fails every call, pending and later, with `EngineProcessError`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._unsent: list[bytes] = []  # calls made while connecting, in order
        self._lost: EngineProcessError | None = None

    def __getattr__(self, name: str) -> _Call:
        if name not in CALLS:
            raise AttributeError(name)
        return _Call(self, name)

    def call(self, name: str, args: tuple, kwargs: dict) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            # a fresh context: the reader serves every caller, not the request that happened to connect
            loop.create_task(self._connect(), context=contextvars.Context())
        elif loop is not self._loop:
            raise RuntimeError("an EngineConnection serves the event loop that first used it")
        future = loop.create_future()
        if self._lost is not None:
            future.set_exception(self._lost)
            return future
        call_id = next(self._ids)
        self._pending[call_id] = future
        frame = _frame((call_id, name, args, kwargs))
        if self._writer is None:
            self._unsent.append(frame)
        else:
            self._writer.write(frame)
        return future

    async def _connect(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.address)
        except OSError as err:
            self._fail(f"cannot reach the engine process: {err}")
            return
        for frame in self._unsent:
            self._writer.write(frame)
        self._unsent.clear()
        try:
            while True:
                call_id, ok, value = await _read_frame(reader)
                future = self._pending.pop(call_id, None)
                if future is not None and not future.done():  # its caller may have stopped waiting
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            self._fail(f"lost the engine process: {err!r}")
        except Exception as err:  # noqa: BLE001 - an answer that does not unpickle: no call may wait forever
            self._fail(f"an unreadable answer from the engine process: {err!r}")

    def _fail(self, message: str) -> None:
        self._lost = EngineProcessError(message)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._lost)
        if self._writer is not None:
            self._writer.close()


class EngineProcess:
    """Starts the engine process for `config` and waits until it serves (raising `EngineProcessError`
    with its reason if it fails first). `connection` reaches it; `info` is its model's
    `max_model_len` and `vocab_size`."""

    def __init__(self, config: AptServeConfig) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no threads or locks inherited
        self._dir = tempfile.mkdtemp(prefix="aptserve-engine-")
        address = str(Path(self._dir) / "engine.sock")
        self._control, child_end = context.Pipe()
        self.process = context.Process(target=run_engine_process, args=(config.model_dump(), address, child_end),
                                       name="aptserve-engine")
        self.process.start()
        child_end.close()
        try:
            status, detail = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if status != "ready":
            self.stop()
            raise EngineProcessError(f"the engine process failed to start: {detail}")
        self.info: dict[str, int] = detail
        self.connection = EngineConnection(address)

    def _wait_ready(self) -> tuple[str, Any]:
        """The child's `("ready", model info)` or `("failed", why)`; if it exits without a word, how it exited."""
        while self.process.is_alive() or self._control.poll(0):
            if self._control.poll(1.0):
                try:
                    return self._control.recv()
                except EOFError:  # its end closed: it exited
                    break
        self.process.join(5)
        return "failed", f"it exited with status {self.process.exitcode}"

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the engine process to stop (it finishes the step in progress), then make sure it did."""
        try:
            self._control.send("stop")
        except OSError:
            pass  # it is gone already
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.warning("the engine process did not stop within %.0f s: killing it", timeout_s)
            self.process.kill()
            self.process.join()
        self._control.close()
        shutil.rmtree(self._dir, ignore_errors=True)
