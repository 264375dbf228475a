"""What a failed request is told: one classification of every exception, answered by HTTP and gRPC alike.

Answers carry a kind and a short message, never a traceback, a file path or an id of ours: Ray wraps an
actor's exception in a `RayTaskError` whose text is the whole remote traceback, so the cause is unwrapped
and only the first line of its message is kept. The full exception is logged server-side.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

import grpc

from cluster.ray_runtime import ACTOR_FAILURES, unwrap_remote
from hybrid_cache.layout import HiddenCacheUnavailable
from scheduler_service.async_engine import EngineDeadError
from scheduler_service.engine import DuplicateRequestId, QueueFull

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 300  # a message longer than this is cut: answers stay one short line


class RequestTimeout(Exception):
    """A request ran past `server.request_timeout_s`: it is aborted (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


class RequestAborted(Exception):
    """The request was aborted (gRPC `Abort`) while its stream was open (gRPC CANCELLED)."""


class NoHealthyReplica(RuntimeError):
    """Every engine replica is down or restarting (HTTP 503 + Retry-After, gRPC UNAVAILABLE)."""


class ReplicaFailed(RuntimeError):
    """The engine under a request failed (its loop, or the replica actor): HTTP 503, gRPC UNAVAILABLE."""


class InvalidField(ValueError):
    """A request field has a value this server refuses; `param` names it."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(LookupError):
    """The request names a model this server does not serve."""


class Kind(Enum):
    """(HTTP status, OpenAI error type, gRPC status code) of each way a request can fail."""

    INVALID = (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    NOT_FOUND = (404, "not_found_error", grpc.StatusCode.NOT_FOUND)
    ALREADY_EXISTS = (409, "invalid_request_error", grpc.StatusCode.ALREADY_EXISTS)
    TOO_LARGE = (413, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    OVERLOADED = (503, "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    UNAVAILABLE = (503, "server_error", grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED)
    CANCELLED = (499, "cancelled_error", grpc.StatusCode.CANCELLED)
    INTERNAL = (500, "server_error", grpc.StatusCode.INTERNAL)

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[2]

    @property
    def retry_later(self) -> bool:
        """Answers of this kind tell the client when to retry (HTTP Retry-After)."""
        return self in (Kind.OVERLOADED, Kind.UNAVAILABLE)


# The engine under the request is gone or stopped: the router marks its replica down.
ENGINE_FAILURES: tuple[type[BaseException], ...] = (EngineDeadError, ReplicaFailed, NoHealthyReplica, *ACTOR_FAILURES)

# Checked in order: the first class an exception is an instance of gives its kind.
_KINDS: tuple[tuple[type[BaseException], Kind], ...] = (
    (RequestTimeout, Kind.TIMEOUT),
    (RequestAborted, Kind.CANCELLED),
    (QueueFull, Kind.OVERLOADED),
    (DuplicateRequestId, Kind.ALREADY_EXISTS),
    (ModelNotFound, Kind.NOT_FOUND),
    (ENGINE_FAILURES, Kind.UNAVAILABLE),  # type: ignore[arg-type]
    (HiddenCacheUnavailable, Kind.INVALID),
    (ValueError, Kind.INVALID),
)


@dataclass(frozen=True)
class Failure:
    """What a client is told: the kind, a one-line message, and the request field at fault (if known)."""

    kind: Kind
    message: str
    param: str | None = None


def unwrap(err: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's wrappers (`cluster/ray_runtime.py`)."""
    return unwrap_remote(err)


def one_line(text: str) -> str:
    """The first line of `text`, cut to `MAX_MESSAGE_CHARS`."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


def field_named_in(message: str, fields: Collection[str]) -> str | None:
    """The request field a message starts with (`temperature must be ...`, `` `logprobs` is ...``), if any."""
    first = re.match(r"`?(\w+)`?", message)
    return first.group(1) if first and first.group(1) in fields else None


def classify(err: BaseException, param: str | None = None, fields: Collection[str] = ()) -> Failure:
    """The answer for `err`; the field at fault is the one the error names (its `param`, or the first
    word of its message if that is one of `fields`), else `param`. An exception of no known kind is
    logged and answered with a generic message."""
    cause = unwrap(err)
    for types, kind in _KINDS:
        if isinstance(cause, types):
            if kind is Kind.UNAVAILABLE:
                log.warning("engine replica failure: %r", err)
                return Failure(kind, "the model's engine is unavailable; retry shortly")
            message = one_line(str(cause)) or kind.name.lower()
            if isinstance(cause, HiddenCacheUnavailable):
                param = "cache_type"
            param = getattr(cause, "param", None) or field_named_in(message, fields) or param
            return Failure(kind, message, param)
    log.error("unexpected error while serving a request", exc_info=err)
    return Failure(Kind.INTERNAL, "internal server error")


# A stream the engine ended with an error (finish_reason "error"): the engine failed under the request.
ENGINE_FAILED_REQUEST = Failure(Kind.UNAVAILABLE, "the model's engine failed while running this request")
