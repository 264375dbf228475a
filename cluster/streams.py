"""A request's output stream as the front ends send it: text deltas and the request's deadline.

HTTP (`cluster/http_server.py`) and gRPC (`cluster/grpc_servicer.py`) both send text through
`TextDeltas` and bound every stream with `Deadline`, so the two answer the same request the same way;
`merged` reads the streams of a batch of prompts as one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from cluster.errors import RequestTimeout
from scheduler_service.request import RequestOutput


def visible(text: str, stops: tuple[str, ...], finished: bool) -> str:
    """Text safe to send: hold back what a stop string may still cut, and half-decoded characters."""
    if finished:
        return text
    if stops:
        text = text[: max(0, len(text) - (max(len(s) for s in stops) - 1))]
    return text.rstrip("\ufffd")


class TextDeltas:
    """The new text of each output of one request: what became safe to send since the last one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.sent = 0

    def next(self, output: RequestOutput) -> str:
        # A sample of several (`n`) ends with its finish reason, before the request's last output.
        text = visible(output.text, self.stops, output.finished or output.finish_reason is not None)
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


class RequestStream:
    """A request's outputs, closed exactly once however its consumer ends: by reading to the finished
    output, on an error, or by `aclose()`, even if it never read anything (a client gone before the
    body started). Closing a stream that has not finished abandons its request (`abandon()`, which
    aborts it and must not wait); `closed(error)` then does the gateway's bookkeeping.
    """

    def __init__(
        self,
        inner: AsyncIterator[RequestOutput],
        abandon: Callable[[], None],
        closed: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self._inner, self._abandon, self._closed_hook = inner, abandon, closed
        self.finished = False
        self._closed = False
        self._reading = False
        self._error: BaseException | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        self._reading = True
        try:
            output = await anext(self._inner)
        except StopAsyncIteration:
            self.finished = True
            await self.aclose()
            raise
        except Exception as err:  # the engine ended the request with an error: nothing left to abort
            self.finished, self._error = True, err
            await self.aclose()
            raise
        finally:
            self._reading = False
        if output.finished:
            self.finished = True
        return output

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.finished:
                self._abandon()
            if not self._reading:  # a read in progress (in a task being cancelled) ends the inner stream itself
                await self._inner.aclose()  # type: ignore[attr-defined]
        finally:
            if self._closed_hook is not None:
                self._closed_hook(self._error)


class Deadline:
    """`stream`, ended with `RequestTimeout` once `timeout_s` have passed: first `on_timeout()` (which
    aborts the request as timed out, so the engine counts it as such), then the stream is closed.
    Closing this closes `stream`.

    Each output is awaited in a helper task, so that the timeout does not cancel the stream's own wait
    (a cancelled stream aborts its request as abandoned by its client, before `on_timeout` could). A
    cancelled consumer cancels the helper, which aborts the request as abandoned: it was.
    """

    def __init__(
        self, stream: RequestStream, timeout_s: float, on_timeout: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.stream, self.timeout_s, self.on_timeout = stream, timeout_s, on_timeout
        self._deadline = asyncio.get_running_loop().time() + timeout_s

    def __aiter__(self) -> Deadline:
        return self

    async def __anext__(self) -> RequestOutput:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(anext(self.stream))
        try:
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, self._deadline - loop.time()))
        except BaseException:  # the consumer was cancelled: so is its read, which abandons the request
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            raise
        if done:
            return waiting.result()  # raises StopAsyncIteration at the end, or the stream's error
        if self.on_timeout is not None:
            await self.on_timeout()
        waiting.cancel()
        with contextlib.suppress(BaseException):  # the cancelled wait, or an error that came meanwhile
            await waiting
        await self.aclose()
        raise RequestTimeout(f"the request took longer than {self.timeout_s:g} s and was aborted")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def merged(streams: list[Deadline]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams (a batch of prompts) as they come, each with its stream's index.
    The first error ends the merge and is raised; however the merge ends, every stream is closed
    (those not finished abort their requests)."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: Deadline) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, err))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for stream in streams:
            await stream.aclose()
