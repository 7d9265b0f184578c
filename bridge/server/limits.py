"""What a request body may be: a size cap, enforced while the body arrives (before anything
parses it), and plain JSON (RFC 8259), checked where FastAPI parses it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.server.errors import BodyTooLarge, error_response

# Deeper bodies are refused before they reach code that recurses on them.
JSON_DEPTH_LIMIT = 64
FILE_UPLOAD_PATH = re.compile(r"/api/v1/loops/[^/]+/files/")


def file_upload(scope: Scope) -> bool:
    """`PUT /files/{path}`: its route streams the body to disk under its own, larger cap."""
    return scope["method"] == "PUT" and FILE_UPLOAD_PATH.match(scope["path"]) is not None


class BodyLimit:
    def __init__(
        self, app: ASGIApp, limit: int, streamed: Callable[[Scope], bool] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.streamed is not None and self.streamed(scope)):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        # Only receive is wrapped: wrapping send would tax every SSE write.
        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            "content_too_large", f"the request body is over {self.limit} bytes"
        )
        await response(scope, receive, send)


def parse_json(raw: bytes) -> Any:
    """Plain JSON: UTF-8, finite numbers only (no NaN, Infinity or 1e999), no lone
    surrogates, not nested too deeply.

    Python's parser takes all of these, and each breaks something later: a surrogate
    cannot be stored or sent back, NaN cannot be answered as JSON, depth overflows
    the stack of whatever walks the value.
    """
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8") from None
    except RecursionError:
        raise ValueError(f"it is nested deeper than {JSON_DEPTH_LIMIT} levels") from None
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > JSON_DEPTH_LIMIT:
                raise ValueError(f"it is nested deeper than {JSON_DEPTH_LIMIT} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON that Python reads as infinity, which nothing can store or answer.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate") from None


class JSONRequest(Request):
    """A request whose JSON body is parsed strictly.

    FastAPI parses the body before it checks credentials; so a body that is not JSON is
    noted in the request's state and read as None, which fails validation, and the
    validation error handler reports it, after the credential and owner checks.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except ValueError as exc:  # JSONDecodeError is one
                self.state.invalid_json = str(exc)
                self._json = None
        return self._json


class JSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(JSONRequest(request.scope, request.receive))

        return strict_json_handler
