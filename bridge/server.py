"""The HTTP server: FastAPI app serving Loop API v1 under /api/v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from bridge import errors
from bridge.auth import SESSION_COOKIE, Authenticator, RateLimiter
from bridge.errors import ApiError
from bridge.limits import BodyLimit, JSONRoute
from bridge.metrics import RequestCounter, metrics_endpoint
from bridge.schemas import (
    CONTENT_LIMIT,
    IDEMPOTENCY_KEY_LIMIT,
    METADATA_LIMIT,
    TITLE_LIMIT,
    ChoiceAnswer,
    CreateLoop,
    CreateToken,
    ErrorResponse,
    HistoryPage,
    InterruptBody,
    Login,
    LoopDetail,
    LoopOut,
    LoopPage,
    Person,
    SendMessage,
    TokenCreated,
    TokenList,
    TokenOut,
    UsageReport,
    metadata_size,
)
from bridge.sse import event_stream
from core import logctx
from core.engine import Engine
from core.errors import EngineError
from core.ids import utcnow

API_PREFIX = "/api/v1"
USAGE_WINDOW = timedelta(days=30)
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "events"}
}


async def _user(request: Request) -> str:
    user = await request.app.state.auth.user(request)
    logctx.bind(user=user)
    return user


async def _session_user(request: Request) -> str:
    return await request.app.state.auth.session_user(request)


User = Annotated[str, Depends(_user)]
SessionUser = Annotated[str, Depends(_session_user)]


async def _owner(loop_id: str, request: Request, user: User) -> str:
    """The caller, once the loop exists and is theirs: checked before anything else
    about the request (its body, query or headers)."""
    await request.app.state.engine.check_owner(user, loop_id)
    logctx.bind(loop_id=loop_id)
    return user


Owner = Annotated[str, Depends(_owner)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in (400, 401, 429, *statuses)}


def create_app(engine: Engine, *, manage_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.close()

    app = FastAPI(
        title="loopbridge — Loop API v1",
        version="1.0",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=CONTENT_LIMIT * 2)
    if engine.settings.metrics:
        app.add_middleware(RequestCounter)
    errors.install(app)
    app.state.engine = engine
    app.state.auth = Authenticator(
        engine.accounts, RateLimiter(engine.settings.rate_limit_per_minute)
    )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        return errors.error_response("not_ready", "the engine is starting")

    app.add_api_route(
        "/metrics", metrics_endpoint(engine.settings), methods=["GET"], include_in_schema=False
    )
    # The prefix is the routers' own, so each route's template (a metrics label) is whole.
    app.include_router(_loop_routes(engine))
    app.include_router(_usage_routes(engine))
    app.include_router(_account_routes(engine))
    return app


def _loop_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["loops"], route_class=JSONRoute)

    @router.post("/loops", status_code=201, response_model=LoopOut, responses=_errors())
    async def create_loop(body: CreateLoop, user: User) -> Any:
        if len(body.title) > TITLE_LIMIT:
            raise ApiError("title_too_long", f"title is over {TITLE_LIMIT} characters")
        if metadata_size(body.metadata) > METADATA_LIMIT:
            raise ApiError("metadata_too_large", "metadata is over 16 KB as JSON")
        loop = await engine.create_loop(
            user, body.title, body.metadata, body.profiles, body.vault, body.repo
        )
        return asdict(loop)

    @router.get("/loops", response_model=LoopPage, responses=_errors())
    async def list_loops(
        request: Request,
        user: User,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: str | None = None,
        before: str | None = None,
        archived: bool = False,
    ) -> Any:
        metadata = {
            key.removeprefix("metadata."): value
            for key, value in request.query_params.multi_items()
            if key.startswith("metadata.") and len(key) > len("metadata.")
        }
        if any('"' in key or "\x00" in key for key in metadata):
            # A JSON path (the SQLite engine's) cannot name such a key.
            raise ApiError("invalid_request", 'a metadata filter key may not hold " or NUL')
        page = await engine.list_loops(user, limit, after, before, archived, metadata)
        return asdict(page)

    @router.get("/loops/{loop_id}", response_model=LoopDetail, responses=_errors(403, 404))
    async def get_loop(loop_id: str, user: Owner) -> Any:
        return asdict(await engine.get_loop(user, loop_id))

    @router.delete("/loops/{loop_id}", status_code=204, responses=_errors(403, 404))
    async def archive_loop(loop_id: str, user: Owner) -> Response:
        await engine.archive_loop(user, loop_id)
        return Response(status_code=204)

    @router.post(
        "/loops/{loop_id}/messages",
        response_class=Response,
        responses={**SSE_RESPONSE, **_errors(403, 404, 409)},
        description="Errors also: `429 budget_exceeded` with `Retry-After` when a budget "
        "the message falls under is spent [ext].",
    )
    async def send_message(
        loop_id: str,
        body: SendMessage,
        user: Owner,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        if not body.content:
            raise ApiError("missing_content", "content must be a non-empty string")
        if len(body.content.encode()) > CONTENT_LIMIT:
            raise ApiError("content_too_large", "content is over 1 MB")
        if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_LIMIT:
            raise ApiError("idempotency_key_too_long", "Idempotency-Key is over 256 characters")
        author = body.author.model_dump(exclude_none=True) if body.author is not None else None
        if author is not None:
            logctx.bind(author=author["id"])
        stream = await engine.send(
            user, loop_id, body.content, body.permission_mode, idempotency_key or None, author
        )
        return event_stream(stream.events, {"X-Turn-Id": stream.turn_id})

    @router.get(
        "/loops/{loop_id}/events",
        response_class=Response,
        responses={**SSE_RESPONSE, **_errors(403, 404)},
    )
    async def watch_loop(
        loop_id: str,
        user: Owner,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        resume = None
        if last_event_id is not None:
            value = last_event_id.strip()
            # ASCII digits only (isdigit takes "²"), and few enough to fit a 64-bit integer.
            if not (value.isascii() and value.isdigit() and len(value) <= 18):
                raise ApiError("invalid_last_event_id", "Last-Event-ID must be an event id")
            resume = int(value)
        return event_stream(await engine.watch(user, loop_id, resume))

    @router.get(
        "/loops/{loop_id}/messages", response_model=HistoryPage, responses=_errors(403, 404)
    )
    async def history(
        loop_id: str,
        user: Owner,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: str | None = None,
    ) -> Any:
        return asdict(await engine.history(user, loop_id, limit, after))

    @router.post(
        "/loops/{loop_id}/choices/{choice_id}",
        status_code=202,
        responses=_errors(403, 404),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ChoiceAnswer.model_json_schema()}},
            }
        },
    )
    async def answer_choice(
        loop_id: str, choice_id: str, request: Request, user: Owner
    ) -> Response:
        body = await request.json()  # after the owner check; None when not JSON
        if not isinstance(body, dict):
            raise ApiError("invalid_choice_payload", "the body must be a JSON object")
        source = body.pop("source", "api")
        if not isinstance(source, str) or not 0 < len(source) <= 64:
            raise ApiError("invalid_choice_payload", "source must be a short string")
        by = _person(body.pop("by", None), "invalid_choice_payload")
        await engine.answer_choice(user, loop_id, choice_id, body, source, by)
        return Response(status_code=202)

    @router.post(
        "/loops/{loop_id}/interrupt",
        status_code=202,
        responses=_errors(403, 404),
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": InterruptBody.model_json_schema()}},
            }
        },
    )
    async def interrupt(loop_id: str, request: Request, user: Owner) -> Response:
        # [ext] an optional body names who interrupted, for the audit trail.
        raw = await request.body()
        body = InterruptBody()
        if raw.strip():
            try:
                body = InterruptBody.model_validate_json(raw)
            except ValueError:
                raise ApiError(
                    "invalid_request", "the body must be {source?, by?: {id, name?}}"
                ) from None
        by = body.by.model_dump(exclude_none=True) if body.by is not None else None
        await engine.interrupt(user, loop_id, body.source or "api", by)
        return Response(status_code=202)

    return router


def _person(raw: Any, code: str) -> dict[str, Any] | None:
    """An optional `{id, name?}` of a person, or the given error code."""
    if raw is None:
        return None
    try:
        return Person.model_validate(raw).model_dump(exclude_none=True)
    except ValueError:
        raise ApiError(code, "by must be {id, name?}, each at most 200 characters") from None


def _usage_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["usage"], route_class=JSONRoute)

    @router.get("/usage", response_model=UsageReport, responses=_errors())
    async def usage(
        user: User, since: str | None = None, until: str | None = None, group_by: str = "day"
    ) -> Any:
        """[ext] What the caller's own loops' turns cost, per UTC day, loop or author."""
        end = _moment(until) if until is not None else utcnow()
        try:
            start = _moment(since) if since is not None else end - USAGE_WINDOW
        except OverflowError:
            raise ApiError("invalid_usage_query", "until is too early to count back from") from None
        return asdict(await engine.usage_report(user, start, end, group_by))

    return router


def _moment(value: str) -> datetime:
    """An RFC 3339 time with its zone (`Z` or an offset)."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise ApiError("invalid_usage_query", f"{value!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None or "T" not in value.upper():
        raise ApiError("invalid_usage_query", f"{value!r} needs a date, a time and a zone")
    return moment


def _account_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["accounts"], route_class=JSONRoute)

    @router.post("/login", status_code=204, responses=_errors())
    async def login(body: Login, request: Request) -> Response:
        if not await engine.accounts.check_password(body.username, body.password):
            raise ApiError("invalid_credentials", "wrong user name or password")
        secret = await engine.accounts.create_session(body.username)
        response = Response(status_code=204)
        response.set_cookie(
            SESSION_COOKIE,
            secret,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @router.post("/logout", status_code=204)
    async def logout(request: Request) -> Response:
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            await engine.accounts.end_session(secret)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @router.post("/me/tokens", status_code=201, response_model=TokenCreated, responses=_errors())
    async def create_token(body: CreateToken, user: SessionUser) -> Any:
        info, token = await engine.accounts.create_token(user, body.label)
        return TokenCreated(
            tokenId=info.token_id, token=token, label=info.label, createdAt=info.created_at
        )

    @router.get("/me/tokens", response_model=TokenList, responses=_errors())
    async def list_tokens(user: SessionUser) -> Any:
        infos = await engine.accounts.list_tokens(user)
        return TokenList(
            tokens=[
                TokenOut(
                    tokenId=i.token_id,
                    label=i.label,
                    createdAt=i.created_at,
                    lastUsedAt=i.last_used_at,
                )
                for i in infos
            ]
        )

    @router.delete("/me/tokens/{token_id}", status_code=204, responses=_errors(404))
    async def revoke_token(token_id: str, user: SessionUser) -> Response:
        if not await engine.accounts.revoke_token(token_id, user):
            raise EngineError("token_not_found", f"no token {token_id}")
        return Response(status_code=204)

    return router
