"""The contract's JSON errors: every failure answers `{"error": {type, code, message}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from core.errors import EngineError

log = logging.getLogger(__name__)

# code → (HTTP status, error type); codes not listed are 400 invalid_request_error.
CODES: dict[str, tuple[int, str]] = {
    "missing_credentials": (401, "authentication_error"),
    "invalid_token": (401, "authentication_error"),
    "invalid_credentials": (401, "authentication_error"),
    "not_loop_owner": (403, "permission_error"),
    "vault_not_allowed": (403, "permission_error"),
    "profile_not_allowed": (403, "permission_error"),
    "repo_not_allowed": (403, "permission_error"),
    "csrf_failed": (403, "permission_error"),
    "invalid_view_link": (403, "permission_error"),
    "loop_not_found": (404, "not_found_error"),
    "choice_not_found": (404, "not_found_error"),
    "token_not_found": (404, "not_found_error"),
    "file_not_found": (404, "not_found_error"),
    "not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_timeout": (408, "invalid_request_error"),
    "idempotency_key_reused": (409, "conflict_error"),
    "user_exists": (409, "conflict_error"),
    "uri_too_long": (414, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "too_many_requests": (429, "rate_limit_error"),
    "headers_too_large": (431, "invalid_request_error"),
    "budget_exceeded": (429, "rate_limit_error"),
    "sandbox_spawn_failed": (500, "internal_error"),
    "sandbox_evicted": (500, "internal_error"),
    "agent_failed": (500, "internal_error"),
    "internal_error": (500, "internal_error"),
    "not_ready": (503, "internal_error"),
    "server_busy": (503, "internal_error"),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """The body grew past the server's cap while it arrived.

    An HTTPException because FastAPI's body parsing passes those on, where it would turn
    any other exception into a generic parse error.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(400, f"the request body is over {limit} bytes")


def status_of(code: str) -> tuple[int, str]:
    """The HTTP status and error type of a code."""
    return CODES.get(code, (400, "invalid_request_error"))


def error_body(code: str, message: str) -> tuple[int, dict[str, dict[str, str]]]:
    """The status and JSON body of an error."""
    status, kind = status_of(code)
    return status, {"error": {"type": kind, "code": code, "message": message}}


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = error_body(code, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_code(exc: RequestValidationError) -> tuple[str, str]:
    """Name the first problem of a request that does not fit its model."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    field = loc[-1] if loc else "body"
    where = ".".join(loc[1:]) if len(loc) > 1 else loc[0] if loc else "body"
    message = f"{where}: {first.get('msg', 'invalid')}"
    if loc[:1] == ["body"] and first.get("type") == "json_invalid":
        return "invalid_json", "the body is not valid JSON"
    kind = first.get("type")
    if field == "content" and kind in ("missing", "string_too_short"):
        return "missing_content", "content must be a non-empty string"
    if field == "content" and kind == "string_too_long":
        return "content_too_large", "content is over 1 MB"
    if field == "title" and kind == "string_too_long":
        return "title_too_long", "title is over 200 characters"
    if field.lower() == "idempotency-key" and kind == "string_too_long":
        return "idempotency_key_too_long", "Idempotency-Key is over 256 characters"
    if field == "permission_mode":
        return "invalid_permission_mode", message
    if loc[1:2] == ["author"]:
        return "invalid_author", message
    return "invalid_request", message


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API document lists at this path (several routes may share a path,
    so the router alone, which names the first route's, cannot say)."""
    table = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = []
        for path, item in request.app.openapi()["paths"].items():
            methods = {method.upper() for method in item if method != "parameters"}
            if "GET" in methods:
                methods.add("HEAD")  # every GET route answers HEAD too
            table.append((compile_path(path)[0], sorted(methods)))
        request.app.state.allowed_methods = table
    path = request.scope.get("path", "")
    return next((methods for pattern, methods in table if pattern.match(path)), [])


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.headers)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_response(exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reason = getattr(request.state, "invalid_json", None)  # see limits.JSONRequest
        if reason is not None:
            return error_response("invalid_json", f"the body is not valid JSON: {reason}")
        return error_response(*_validation_code(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return error_response("content_too_large", str(exc.detail))
        if exc.status_code == 404:
            return error_response("not_found", "no such route")
        if exc.status_code == 405:
            allow = ", ".join(_allowed_methods(request)) or (exc.headers or {}).get("Allow", "")
            return error_response(
                "method_not_allowed", "this route does not take that method", {"Allow": allow}
            )
        return error_response("invalid_request", str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response("internal_error", "the server failed; see its log")
