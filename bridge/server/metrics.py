"""`GET /metrics` (Prometheus text) and the HTTP request counter.

The counter is a plain ASGI middleware that counts a request when its response
starts, labelled with the route's template (never an id): a streaming response
costs it nothing per chunk beyond one flag test.
"""

from __future__ import annotations

import secrets
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.server.errors import error_response
from core.config import Settings

HTTP_REQUESTS = Counter(
    "loopbridge_http_requests", "HTTP requests answered", ["method", "route", "status"]
)
# Any other method is counted as OTHER, so a client cannot grow the label set.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"


class RequestCounter:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if not counted and message["type"] == "http.response.start":
                counted = True
                method = scope["method"] if scope["method"] in METHODS else "OTHER"
                route = getattr(scope.get("route"), "path", None) or UNMATCHED
                HTTP_REQUESTS.labels(method, route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def metrics_endpoint(settings: Settings) -> Any:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    async def metrics(request: Request) -> Response:
        if not settings.metrics:
            return error_response("not_found", "metrics are turned off")
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if not given:
                return error_response("missing_credentials", "metrics need a bearer token")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, token):
                return error_response("invalid_token", "wrong metrics token")
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return metrics
