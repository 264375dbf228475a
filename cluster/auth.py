"""API-key authentication, as vLLM's `--api-key`: every request but the open paths carries
`Authorization: Bearer <key>`, else it is answered 401 (OpenAI's error JSON) and goes no further.

The check is an ASGI middleware in front of the routes (not a route dependency), so a refused request
never reaches body parsing, validation or an engine. `/health` and `/metrics` stay open: probes and
Prometheus scrape without the key. The key is compared in constant time. gRPC calls (`cluster/serve_app.py`)
carry the same key as `authorization` metadata, else end UNAUTHENTICATED; `Health` stays open.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

# Paths served without the key (Kubernetes probes, Prometheus).
OPEN_PATHS = frozenset({"/health", "/metrics"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def bearer_matches(authorization: str | None, key: str) -> bool:
    """`authorization` (an `Authorization` header or gRPC metadata value) is `Bearer <key>`."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"), key.encode("utf-8"))


def metadata_authorized(key: str | None, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """A gRPC call's metadata carries `authorization: Bearer <key>` (always true when no key is asked)."""
    if key is None:
        return True
    for name, value in metadata:
        if name.lower() == "authorization":
            return bearer_matches(value.decode("latin-1") if isinstance(value, bytes) else value, key)
    return False


UNAUTHORIZED_MESSAGE = "a valid API key is required: send `Authorization: Bearer <key>`"


def unauthorized_body() -> dict[str, Any]:
    return {"error": {"message": UNAUTHORIZED_MESSAGE,
                      "type": "authentication_error", "param": None, "code": 401}}


class ApiKeyMiddleware:
    """Refuses every HTTP request to a path outside `OPEN_PATHS` that lacks the key `current_key()`
    returns (read per request: a Serve replica installs its front end after the app is built; None
    means no key is asked). `on_refused` counts each refusal."""

    def __init__(self, app: ASGIApp, current_key: Callable[[], str | None],
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.current_key = current_key
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.current_key() if scope["type"] == "http" else None
        if key is None or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization")
        if bearer_matches(given.decode("latin-1") if given is not None else None, key):
            await self.app(scope, receive, send)
            return
        self.on_refused()
        body = json.dumps(unauthorized_body()).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})
