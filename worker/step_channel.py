"""The step channel: one TCP connection from the executor to each tensor-parallel rank, carrying each
step's encoded plan in and the sampled tokens out.

Why not a Ray call per step: a call to each rank plus `ray.put`/`ray.wait` costs several milliseconds
on a busy CPU host, where a loopback round trip of a few kilobytes costs about 0.1 ms
(docs/ARCHITECTURE.md, "Step dispatch"; measured in docs/BENCHMARKS.md). Ray still creates, places,
watches and kills the ranks; the channel only moves steps.

Wire format, both ways: a 12-byte prefix (payload length, header length), a JSON header (the message
kind, a text, and each array's name, dtype and shape), then the arrays' raw bytes. No pickle: what a
peer can send is at most a few numeric arrays, and only after it presented the executor's token.
Failure is loud and prompt: a rank whose process ends closes its socket, which the executor reads at
once as `StepChannelError`; a rank that stops answering is given up after the step timeout.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from hybrid_cache.plan_codec import encode_sampled

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_PREFIX = struct.Struct("<QI")  # payload bytes (header included), header bytes
# A step's plan is a few integers per token and block; anything near this size is not one of ours.
MAX_FRAME_BYTES = 1 << 30
_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: nothing that holds Python objects
_HELLO, _READY, _PLAN, _TOKENS, _ERROR = "hello", "ready", "plan", "tokens", "error"


class StepChannelError(RuntimeError):
    """A rank failed the step, ended (its socket closed) or did not answer in time."""


def _frame(kind: str, arrays: Arrays | None = None, text: str = "") -> bytes:
    arrays = {name: np.ascontiguousarray(a) for name, a in (arrays or {}).items()}
    header = json.dumps(
        {"kind": kind, "text": text, "arrays": [[n, a.dtype.str, a.shape] for n, a in arrays.items()]},
        separators=(",", ":"),
    ).encode()
    body = [a.tobytes() for a in arrays.values()]
    size = len(header) + sum(len(b) for b in body)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a {kind} message of {size} bytes is over the channel's limit of {MAX_FRAME_BYTES}")
    return b"".join([_PREFIX.pack(size, len(header)), header, *body])


def _read_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n
    return buffer


def _read_message(sock: socket.socket) -> tuple[str, str, Arrays]:
    """One message: (kind, text, arrays). Raises EOFError on a closed connection, ValueError on garbage."""
    size, header_size = _PREFIX.unpack(_read_exactly(sock, _PREFIX.size))
    if size > MAX_FRAME_BYTES or header_size > size:
        raise ValueError(f"a message of {size} bytes (header {header_size}) is not a step message")
    payload = _read_exactly(sock, size)
    try:
        return _parse(payload, header_size)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"a malformed step message: {err!r}") from err


def _parse(payload: bytearray, header_size: int) -> tuple[str, str, Arrays]:
    size = len(payload)
    header = json.loads(bytes(payload[:header_size]))
    arrays, offset = {}, header_size
    for name, dtype_str, shape in header["arrays"]:
        dtype = _dtype(dtype_str)
        count = math.prod(shape)  # (not np.prod: this runs per array per step, and numpy's costs microseconds)
        if count < 0 or offset + count * dtype.itemsize > size:
            raise ValueError(f"array {name!r} runs past the end of its message")
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
        arrays[name] = array if len(shape) == 1 else array.reshape(shape)
        offset += count * dtype.itemsize
    return str(header["kind"]), str(header["text"]), arrays


@functools.lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    dtype = np.dtype(name)
    if dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"an array has dtype {name}: only numeric arrays travel")
    return dtype


class StepServer:
    """A rank's end: accepts the executor's connection (the first that presents `token`) and runs
    `handler` on each plan, in a background thread, until the executor closes the connection.

    `handler` returns the step's token ids; an exception it raises goes back to the executor as an
    error message (type and first line), and the server keeps serving.
    """

    def __init__(
        self, host: str, token: str, handler: Callable[[Arrays], list[int]], hello_timeout_s: float
    ) -> None:
        self._token, self._handler, self._hello_timeout_s = token.encode(), handler, hello_timeout_s
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="step-channel", daemon=True)
        self._thread.start()

    def _accept(self) -> socket.socket | None:
        """The executor's connection; strangers (a wrong token, garbage, silence) are dropped."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return None  # closed: the rank is shutting down
            try:
                conn.settimeout(self._hello_timeout_s)
                kind, text, _ = _read_message(conn)
                if kind == _HELLO and hmac.compare_digest(text.encode(), self._token):
                    conn.settimeout(None)  # an idle engine sends nothing for as long as it likes
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.sendall(_frame(_READY))
                    return conn
                log.warning("refused a step-channel connection that did not present the executor's token")
            except (OSError, EOFError, ValueError):
                log.warning("dropped a step-channel connection that sent no valid greeting", exc_info=True)
            conn.close()

    def _run(self) -> None:
        conn = self._accept()
        self._listener.close()  # one executor per group: nobody else may connect
        if conn is None:
            return
        self._conn = conn
        with conn:
            while True:
                try:
                    kind, _, arrays = _read_message(conn)
                    answer = self._answer(kind, arrays)
                    conn.sendall(answer)
                except (OSError, EOFError, ValueError):
                    log.info("the executor closed the step channel (or gave up on this rank)")
                    return

    def _answer(self, kind: str, arrays: Arrays) -> bytes:
        if kind != _PLAN:
            return _frame(_ERROR, text=f"expected a plan, got a {kind!r} message")
        try:
            tokens = self._handler(arrays)
        except Exception as err:  # noqa: BLE001 - every failure goes back to the executor
            log.exception("the step failed on this rank")
            first_line = (str(err).splitlines() or [""])[0]
            return _frame(_ERROR, text=f"{type(err).__name__}: {first_line}")
        return _frame(_TOKENS, encode_sampled(tokens))  # the tokens, and their logprobs when asked

    def close(self) -> None:
        """Stop accepting and serving (the executor sees its connection close)."""
        self._listener.close()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the executor


class StepClient:
    """The executor's end: one connection per rank, in rank order. Not thread-safe (one engine loop)."""

    def __init__(self, addresses: list[tuple[str, int]], token: str, timeout_s: float) -> None:
        self.addresses, self.timeout_s = list(addresses), timeout_s
        self._socks: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        try:
            for rank, address in enumerate(addresses):
                sock = socket.create_connection(address, timeout=timeout_s)
                self._socks.append(sock)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(_frame(_HELLO, text=token))
                if _read_message(sock)[0] != _READY:
                    raise StepChannelError(f"rank {rank} did not accept the step channel")
                self._selector.register(sock, selectors.EVENT_READ, rank)
        except (OSError, EOFError, ValueError) as err:
            self.close()
            raise StepChannelError(f"could not open the step channel: {err}") from err

    def run(self, plan: Arrays) -> list[Arrays]:
        """Send `plan` to every rank and return each rank's answer (`plan_codec.encode_sampled`), in rank order.

        Raises StepChannelError as soon as one rank fails or ends (the others may be waiting in a
        collective for it), or when some rank has not answered within the timeout. After that the
        channel is in an unknown state: close it.
        """
        frame = _frame(_PLAN, plan)
        for rank, sock in enumerate(self._socks):
            try:
                sock.sendall(frame)
            except OSError as err:
                raise StepChannelError(f"rank {rank} could not be sent the step: {err}") from err
        answers: list[Arrays | None] = [None] * len(self._socks)
        pending, deadline = len(self._socks), time.monotonic() + self.timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            ready = self._selector.select(remaining) if remaining > 0 else []
            if not ready:
                late = [r for r, a in enumerate(answers) if a is None]
                raise StepChannelError(f"rank(s) {late} did not answer within {self.timeout_s} s")
            for key, _ in ready:
                rank: int = key.data
                answers[rank] = self._receive(rank, max(remaining, 0.001))
                pending -= 1
        return answers  # type: ignore[return-value] - all filled

    def _receive(self, rank: int, timeout_s: float) -> Arrays:
        sock = self._socks[rank]
        sock.settimeout(timeout_s)
        try:
            kind, text, arrays = _read_message(sock)
        except EOFError as err:
            raise StepChannelError(f"rank {rank} closed its step channel: its process ended") from err
        except (OSError, ValueError) as err:
            raise StepChannelError(f"rank {rank}'s answer could not be read: {err}") from err
        if kind == _ERROR:
            raise StepChannelError(f"rank {rank} failed the step: {text}")
        if kind != _TOKENS or "tokens" not in arrays:
            raise StepChannelError(f"rank {rank} answered with a {kind!r} message")
        return arrays

    def close(self) -> None:
        self._selector.close()
        for sock in self._socks:
            sock.close()
        self._socks = []
