"""The step channel: one TCP connection from the executor to each tensor-parallel rank, carrying each
step's encoded plan in and the rank's answer (sampled tokens, timings) out.

Why not a Ray call per step: a call to each rank plus `ray.put`/`ray.wait` costs several milliseconds
on a busy CPU host, where a loopback round trip of a few kilobytes costs about 0.1 ms
(docs/ARCHITECTURE.md, "Step dispatch"; measured in docs/BENCHMARKS.md). Ray still creates, places,
watches and kills the ranks; the channel only moves steps.

Wire format, both ways: a 12-byte prefix (payload length, header length), a binary header (the
message kind, a text, and each array's name, dtype and shape: `_HEAD`, then `_ARRAY` and the dims per
array), then the arrays' raw bytes. A binary header, not JSON: it is built and read with a few
`struct` calls, and a step's latency is mostly such per-message Python work. No pickle: what a peer
can send is at most a few numeric arrays, and only after it presented the executor's token. The two
ends take turns (a plan, then its answer), so a message is read with one `recv` when it fits
`_RECV_BYTES`, and anything after it in the same read is a broken peer.
Failure is loud and prompt: a rank whose process ends closes its socket, which the executor reads at
once as `StepChannelError`; a rank that stops answering is given up after the step timeout.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_PREFIX = struct.Struct("<QI")  # payload bytes (header included), header bytes
_HEAD = struct.Struct("<BIH")  # kind, text bytes, number of arrays
_ARRAY = struct.Struct("<BBB")  # name bytes, dtype bytes, dimensions; then the name, dtype and each dim (<Q)
_DIM = 8  # bytes per dimension
# A step's plan is a few integers per token and block; anything near this size is not one of ours.
MAX_FRAME_BYTES = 1 << 30
# Before a peer has shown the token it may announce no more than a greeting's worth, so a stranger
# cannot make a rank allocate a large buffer.
MAX_HELLO_BYTES = 4096
# One read's worth: a decode plan of a few hundred sequences fits; a longer prefill takes more reads.
_RECV_BYTES = 1 << 16
_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: nothing that holds Python objects
_HELLO, _READY, _PLAN, _TOKENS, _ERROR = "hello", "ready", "plan", "tokens", "error"
_KINDS = (_HELLO, _READY, _PLAN, _TOKENS, _ERROR)  # on the wire as their index
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}


class StepChannelError(RuntimeError):
    """A rank failed the step, ended (its socket closed) or did not answer in time."""


def _frame(kind: str, arrays: Arrays | None = None, text: str = "") -> bytes:
    encoded_text = text.encode()
    arrays = arrays or {}
    head, body = [_HEAD.pack(_KIND_CODES[kind], len(encoded_text), len(arrays)), encoded_text], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        encoded_name, dtype = name.encode(), array.dtype.str.encode()
        head += (_ARRAY.pack(len(encoded_name), len(dtype), array.ndim), encoded_name, dtype,
                 _dims(array.ndim).pack(*array.shape))
        body.append(array.data)  # joined below without an intermediate copy
    header = b"".join(head)
    size = len(header) + sum(b.nbytes for b in body)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a {kind} message of {size} bytes is over the channel's limit of {MAX_FRAME_BYTES}")
    return b"".join([_PREFIX.pack(size, len(header)), header, *body])


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(_RECV_BYTES)
    if not data:
        raise EOFError("the peer closed the connection")
    return data


def _read_message(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> tuple[str, str, Arrays]:
    """One message of at most `max_bytes`: (kind, text, arrays). Raises EOFError on a closed
    connection, ValueError on garbage."""
    data = _receive(sock)
    while len(data) < _PREFIX.size:  # a prefix split across reads: rare
        data += _receive(sock)
    size, header_size = _PREFIX.unpack_from(data)
    if size > max_bytes or header_size > size:
        raise ValueError(f"a message of {size} bytes (header {header_size}) is not a step message")
    end = _PREFIX.size + size
    if len(data) > end:
        raise ValueError("more than one message arrived at once: the peer does not take turns")
    if len(data) == end:  # the usual case: the whole message in one read
        payload = memoryview(data)[_PREFIX.size :]
    else:
        buffer = bytearray(size)
        buffer[: len(data) - _PREFIX.size] = memoryview(data)[_PREFIX.size :]
        _read_into(sock, memoryview(buffer)[len(data) - _PREFIX.size :])
        payload = memoryview(buffer)
    return _parse(payload, header_size)


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n


def _parse(payload: memoryview, header_size: int) -> tuple[str, str, Arrays]:
    size, header = len(payload), bytes(payload[:header_size])  # (slicing bytes is cheaper than a view)
    try:
        kind_code, text_size, count = _HEAD.unpack_from(header)
        at = _HEAD.size
        text = header[at : at + text_size].decode()
        at += text_size
        specs = []
        for _ in range(count):
            name_size, dtype_size, ndim = _ARRAY.unpack_from(header, at)
            at += _ARRAY.size
            name = header[at : at + name_size].decode()
            dtype = _dtype(header[at + name_size : at + name_size + dtype_size])
            at += name_size + dtype_size
            specs.append((name, dtype, _dims(ndim).unpack_from(header, at)))
            at += ndim * _DIM
    except (struct.error, UnicodeDecodeError) as err:
        raise ValueError(f"a malformed step message: {err!r}") from err
    if at != header_size or kind_code >= len(_KINDS):
        raise ValueError(f"a malformed step message: header of {at} bytes, announced {header_size}, kind {kind_code}")
    arrays, offset = {}, header_size
    for name, dtype, shape in specs:
        count = math.prod(shape)  # (not np.prod: this runs per array per step, and numpy's costs microseconds)
        if offset + count * dtype.itemsize > size:
            raise ValueError(f"array {name!r} runs past the end of its message")
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
        arrays[name] = array if len(shape) == 1 else array.reshape(shape)
        offset += count * dtype.itemsize
    return _KINDS[kind_code], text, arrays


@functools.lru_cache(maxsize=256)
def _dims(ndim: int) -> struct.Struct:
    return struct.Struct(f"<{ndim}Q")


@functools.lru_cache(maxsize=64)
def _dtype(name: bytes) -> np.dtype:
    try:
        dtype = np.dtype(name.decode("ascii"))
    except (TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"an array has no numeric dtype: {name!r}") from err
    if dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"an array has dtype {dtype.str}: only numeric arrays travel")
    return dtype


class StepServer:
    """A rank's end: accepts the executor's connection (the first that presents `token`) and runs
    `handler` on each plan, in a background thread, until the executor closes the connection.

    `handler` returns the step's answer (`plan_codec.encode_sampled`, and whatever else the rank
    reports); an exception it raises goes back to the executor as an error message (type and first
    line), and the server keeps serving. The thread that reads a plan runs it and writes the answer:
    no hand-over between threads on the way.
    """

    def __init__(self, host: str, token: str, handler: Callable[[Arrays], Arrays], hello_timeout_s: float) -> None:
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
                kind, text, _ = _read_message(conn, MAX_HELLO_BYTES)
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
            answer = self._handler(arrays)
        except Exception as err:  # noqa: BLE001 - every failure goes back to the executor
            log.exception("the step failed on this rank")
            first_line = (str(err).splitlines() or [""])[0]
            return _frame(_ERROR, text=f"{type(err).__name__}: {first_line}")
        return _frame(_TOKENS, answer)

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
                answers[rank] = self._receive(rank)
                pending -= 1
        return answers  # type: ignore[return-value] - all filled

    def _receive(self, rank: int) -> Arrays:
        """Rank `rank`'s answer, which has begun to arrive. The socket keeps the step timeout set at
        connection (setting it per read costs system calls every step): a rank that stops halfway
        through an answer is given up after at most that long again."""
        try:
            kind, text, arrays = _read_message(self._socks[rank])
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
