"""Request bodies read strictly: bounded size, valid UTF-8, standard JSON (no NaN or Infinity, no
number that overflows to infinity) and valid Unicode (no lone surrogate such as "\\ud800", which
`json.loads` accepts but no tokenizer can encode).

Starlette's `Request.json()` accepts all of these; `StrictJSONRoute` makes FastAPI parse bodies here.
A refusal is an HTTPException (413 or 400), answered in OpenAI's shape by the app's handler.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute


def _no_constant(name: str) -> float:
    raise HTTPException(400, f"the JSON body holds {name}, which JSON does not allow: send finite numbers")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HTTPException(400, f"the JSON body holds the number {text[:40]}, which overflows a float")
    return value


def _check_unicode(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(400, "the JSON body holds a lone surrogate (e.g. \\ud800): not valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


def strict_json(body: bytes) -> Any:
    """The JSON value of `body`, or an HTTPException(400); malformed JSON raises json.JSONDecodeError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HTTPException(400, f"the body is not valid UTF-8 (byte {err.start})") from None
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    _check_unicode(value)
    return value


def strict_route(max_body_bytes: Callable[[], int]) -> type[APIRoute]:
    """An APIRoute class whose requests refuse bodies over `max_body_bytes()` (413) and parse JSON strictly."""

    class StrictRequest(Request):
        async def body(self) -> bytes:
            limit = max_body_bytes()
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, f"the request body is larger than {limit} bytes")
            body = await super().body()
            if len(body) > limit:
                raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return body

        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                self._json = strict_json(await self.body())
            return self._json

    class StrictJSONRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def strict_handler(request: Request) -> Response:
                return await handler(StrictRequest(request.scope, request.receive))

            return strict_handler

    return StrictJSONRoute
