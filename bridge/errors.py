"""The contract's JSON errors: every failure answers `{"error": {type, code, message}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import EngineError

log = logging.getLogger(__name__)

# code → (HTTP status, error type); codes not listed are 400 invalid_request_error.
CODES: dict[str, tuple[int, str]] = {
    "missing_credentials": (401, "authentication_error"),
    "invalid_token": (401, "authentication_error"),
    "invalid_credentials": (401, "authentication_error"),
    "not_loop_owner": (403, "permission_error"),
    "loop_not_found": (404, "not_found_error"),
    "choice_not_found": (404, "not_found_error"),
    "token_not_found": (404, "not_found_error"),
    "not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "idempotency_key_reused": (409, "conflict_error"),
    "user_exists": (409, "conflict_error"),
    "too_many_requests": (429, "rate_limit_error"),
    "budget_exceeded": (429, "rate_limit_error"),
    "sandbox_spawn_failed": (500, "internal_error"),
    "sandbox_evicted": (500, "internal_error"),
    "agent_failed": (500, "internal_error"),
    "internal_error": (500, "internal_error"),
    "not_ready": (503, "internal_error"),
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


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    status, kind = CODES.get(code, (400, "invalid_request_error"))
    body = {"error": {"type": kind, "code": code, "message": message}}
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
    if field == "content" and first.get("type") == "missing":
        return "missing_content", "content is required"
    if field == "permission_mode":
        return "invalid_permission_mode", message
    if loc[:2] == ["body", "author"]:
        return "invalid_author", message
    return "invalid_request", message


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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return error_response("content_too_large", str(exc.detail))
        if exc.status_code == 404:
            return error_response("not_found", "no such route")
        if exc.status_code == 405:
            return error_response("method_not_allowed", "this route does not take that method")
        return error_response("invalid_request", str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response("internal_error", "the server failed; see its log")
