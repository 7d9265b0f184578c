"""The HTTP server: FastAPI app serving Loop API v1 under /api/v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from bridge.contract.models import (
    CHOICE_ANSWER,
    CONTENT_LIMIT,
    IDEMPOTENCY_KEY_LIMIT,
    METADATA_LIMIT,
    Accepted,
    Author,
    CreateLoop,
    CreateToken,
    CreateViewLink,
    HistoryPage,
    InterruptBody,
    Login,
    LoopDetail,
    LoopOut,
    LoopPage,
    SendMessage,
    TokenCreated,
    TokenList,
    TokenOut,
    UsageReport,
    ViewLink,
    metadata_size,
)
from bridge.server import errors, openapi, web
from bridge.server.auth import (
    SESSION_COOKIE,
    Authenticator,
    LoginThrottle,
    RateLimiter,
    check_same_origin,
)
from bridge.server.errors import ApiError
from bridge.server.limits import BodyLimit, JSONRoute, file_upload
from bridge.server.metrics import RequestCounter, metrics_endpoint
from bridge.server.openapi import (
    CURSOR,
    IDEMPOTENCY,
    LIST_LOOPS,
    MALFORMED_JSON,
    PUBLIC,
    RESUME,
    SEND_STREAM,
    SESSION_ONLY,
    TURN_CURSOR,
    TURN_ID_HEADER,
    WATCH_STREAM,
    error_responses,
    stream_response,
    union_body,
)
from bridge.server.sse import event_stream
from core import logctx
from core.engine import Engine
from core.errors import EngineError
from core.ids import utcnow
from core.replicas.errors import OwnedElsewhere

# Every loop route answers these before anything else about the request.
LOOP = ("not_loop_owner", "loop_not_found")
# POST /loops's answer leads to the loop's other operations (OpenAPI links, for clients and
# stateful fuzzers); not to DELETE: an archived loop stays readable, which a fuzzer would
# take for a use after free.
LOOP_LINKS = {
    name: {"operationId": operation, "parameters": {"loop_id": "$response.body#/id"}}
    for name, operation in {
        "GetLoop": "get_loop",
        "SendMessage": "send_message",
        "WatchLoop": "watch_loop",
        "ListMessages": "history",
        "AnswerChoice": "answer_choice",
        "Interrupt": "interrupt",
    }.items()
}
API_PREFIX = "/api/v1"
USAGE_WINDOW = timedelta(days=30)
# Documented; checked by the handler, which answers the contract's own code for the rest.
MOMENT = {"format": "date-time", "description": "RFC 3339 (default: 30 days before until)"}
GROUPS = {"enum": ["day", "loop", "author"]}
ACCEPTED = "Accepted; its effects show on the loop's event streams."
CHOICE_BODY = union_body("ChoiceAnswer", CHOICE_ANSWER)
# Documented, and checked in the handler, which answers its own code (invalid_last_event_id).
EVENT_ID = {"pattern": "^[0-9]{1,18}$"}


async def _user(request: Request) -> str:
    user: str = await request.app.state.auth.user(request)
    logctx.bind(user=user)
    return user


async def _session_user(request: Request) -> str:
    user: str = await request.app.state.auth.session_user(request)
    return user


User = Annotated[str, Depends(_user)]
SessionUser = Annotated[str, Depends(_session_user)]


async def _owner(loop_id: str, request: Request, user: User) -> str:
    """The caller, once the loop exists and is theirs: checked before anything else
    about the request (its body, query or headers)."""
    await request.app.state.engine.check_owner(user, loop_id)
    logctx.bind(loop_id=loop_id)
    return user


Owner = Annotated[str, Depends(_owner)]


async def _reader(loop_id: str, request: Request, grant: str | None = None) -> str:
    """The owner, or [ext] a view link's `grant` for this loop: the read-only routes."""
    if grant:  # an empty grant is no grant
        return web.grant_reader(request, loop_id, grant)
    return await _owner(loop_id, request, await _user(request))


Reader = Annotated[str, Depends(_reader)]


async def _elsewhere(request: Request, loop_id: str, stream: bool = False) -> Response | None:
    """[ext] Several replicas: the owner's answer when another replica runs the loop
    (bridge/server/forward.py); None, at once, with a single process."""
    forward = request.app.state.forward
    return None if forward is None else await forward.elsewhere(request, loop_id, stream)


def create_app(engine: Engine, *, manage_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if app.state.forward is not None:
                await app.state.forward.close()
            if manage_engine:
                await engine.close()

    app = FastAPI(
        title="loopbridge — Loop API v1",
        version="1.0",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    app.add_middleware(BodyLimit, limit=CONTENT_LIMIT * 2, streamed=file_upload)
    if engine.settings.metrics:
        app.add_middleware(RequestCounter)
    errors.install(app)
    openapi.install(app)
    app.state.engine = engine
    app.state.forward = None
    if engine.replicas is not None:  # [ext] several replicas
        from bridge.server.forward import Forwarder

        app.state.forward = Forwarder(engine, engine.replicas)
    settings = engine.settings
    app.state.auth = Authenticator(
        engine.accounts,
        RateLimiter(settings.rate_limit_per_minute, engine.rates),
        LoginThrottle(settings.login_failures_per_name, settings.login_failures_per_address),
    )

    @app.get(
        "/healthz",
        responses={
            200: {"content": {"application/json": {"example": {"status": "ok"}}}},
            **error_responses("not_ready", auth=False),
        },
        openapi_extra=PUBLIC,
        tags=["operations"],
    )
    async def healthz() -> JSONResponse:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        return errors.error_response("not_ready", "the engine is starting")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """200 when the database answers and the event log is being written, else 503
        `not_ready` with the reason (for a load balancer: send work elsewhere)."""
        reason = await engine.readiness()
        if reason is None:
            return JSONResponse({"status": "ok"})
        return errors.error_response("not_ready", reason)

    app.add_api_route(
        "/metrics", metrics_endpoint(engine.settings), methods=["GET"], include_in_schema=False
    )
    # The prefix is the routers' own, so each route's template (a metrics label) is whole.
    app.include_router(_loop_routes(engine))
    app.include_router(_usage_routes(engine))
    app.include_router(_account_routes(engine))
    from bridge.server.files import file_routes  # it imports this module's dependencies

    app.include_router(file_routes(engine))
    web.mount(app, engine)
    return app


def _loop_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["loops"], route_class=JSONRoute)

    @router.post(
        "/loops",
        status_code=201,
        response_model=LoopOut,
        responses={
            201: {"links": LOOP_LINKS},
            **error_responses(
                *MALFORMED_JSON,
                "title_too_long",
                "metadata_too_large",
                "unknown_profile",
                "unknown_vault",
                "unknown_repo",
                "invalid_branch",
                "profile_not_allowed",
                "vault_not_allowed",
                "repo_not_allowed",
                "csrf_failed",
                "unsupported_media_type",
            ),
        },
    )
    async def create_loop(body: CreateLoop, user: User) -> Any:
        if metadata_size(body.metadata) > METADATA_LIMIT:
            raise ApiError("metadata_too_large", "metadata is over 16 KB as JSON")
        loop = await engine.create_loop(
            user, body.title, body.metadata, body.profiles, body.vault, body.repo, body.branch
        )
        return asdict(loop)

    @router.get(
        "/loops",
        response_model=LoopPage,
        responses=error_responses(*openapi.MALFORMED, "invalid_cursor"),
        description=LIST_LOOPS,
    )
    async def list_loops(
        request: Request,
        user: User,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(description=CURSOR)] = None,
        before: Annotated[str | None, Query(description=CURSOR)] = None,
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
        page = await engine.list_loops(
            user, limit, after or None, before or None, archived, metadata
        )
        return asdict(page)

    @router.get("/loops/{loop_id}", response_model=LoopDetail, responses=error_responses(*LOOP))
    async def get_loop(loop_id: str, request: Request, user: Owner) -> Any:
        if (forwarded := await _elsewhere(request, loop_id)) is not None:
            return forwarded
        return asdict(await engine.get_loop(user, loop_id))

    @router.delete("/loops/{loop_id}", status_code=204, responses=error_responses(*LOOP))
    async def archive_loop(loop_id: str, request: Request, user: Owner) -> Response:
        if (forwarded := await _elsewhere(request, loop_id)) is not None:
            return forwarded
        await engine.archive_loop(user, loop_id)
        return Response(status_code=204)

    @router.post(
        "/loops/{loop_id}/messages",
        response_class=Response,
        responses={
            **stream_response(SEND_STREAM, TURN_ID_HEADER),
            **error_responses(
                *LOOP,
                *MALFORMED_JSON,
                "missing_content",
                "content_too_large",
                "invalid_permission_mode",
                "idempotency_key_too_long",
                "loop_archived",
                "idempotency_key_reused",
                "invalid_author",
                "too_many_attachments",
                "attachment_not_found",
                "attachment_too_large",
                "invalid_path",
                "profile_not_allowed",
                "vault_not_allowed",
                "repo_not_allowed",
                "csrf_failed",
                "unsupported_media_type",
                "not_ready",
                "budget_exceeded",
            ),
        },
        description="Errors also: `429 budget_exceeded` with `Retry-After` when a budget "
        "the message falls under is spent [ext].",
    )
    async def send_message(
        loop_id: str,
        body: SendMessage,
        request: Request,
        user: Owner,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key", max_length=IDEMPOTENCY_KEY_LIMIT, description=IDEMPOTENCY
            ),
        ] = None,
    ) -> Response:
        if len(body.content.encode()) > CONTENT_LIMIT:
            raise ApiError("content_too_large", "content is over 1 MB")
        author = body.author.model_dump() if body.author is not None else None
        if author is not None:
            logctx.bind(author=author["id"])
        attachments = [a.path for a in body.attachments] if body.attachments else None
        if (forwarded := await _elsewhere(request, loop_id, stream=True)) is not None:
            return forwarded
        try:
            stream = await engine.send(
                user,
                loop_id,
                body.content,
                body.permission_mode,
                idempotency_key or None,
                author,
                attachments=attachments,
            )
        except OwnedElsewhere:  # [ext] another replica claimed the loop meanwhile
            if (forwarded := await _elsewhere(request, loop_id, stream=True)) is not None:
                return forwarded
            raise
        return event_stream(stream.events, {"X-Turn-Id": stream.turn_id})

    @router.get(
        "/loops/{loop_id}/events",
        response_class=Response,
        responses={
            **stream_response(WATCH_STREAM),
            **error_responses(
                *LOOP, *openapi.MALFORMED, "invalid_last_event_id", "not_ready", "invalid_view_link"
            ),
        },
    )
    async def watch_loop(
        loop_id: str,
        user: Reader,
        last_event_id: Annotated[
            str | None,
            Header(alias="Last-Event-ID", description=RESUME, json_schema_extra=EVENT_ID),
        ] = None,
        resume_after: Annotated[
            str | None,
            Query(
                alias="last_event_id",
                description="[ext] where to resume when no Last-Event-ID header is sent "
                "(an EventSource cannot send one at first); the header wins",
                json_schema_extra=EVENT_ID,
            ),
        ] = None,
    ) -> Response:
        # Both are checked when both are given; the header wins.
        given = [_event_id(value) for value in (last_event_id, resume_after) if value is not None]
        resume = given[0] if given else None
        return event_stream(await engine.watch(user, loop_id, resume))

    @router.get(
        "/loops/{loop_id}/messages",
        response_model=HistoryPage,
        responses=error_responses(*LOOP, *openapi.MALFORMED, "invalid_cursor", "invalid_view_link"),
    )
    async def history(
        loop_id: str,
        request: Request,
        user: Reader,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(description=TURN_CURSOR)] = None,
    ) -> Any:
        if (forwarded := await _elsewhere(request, loop_id)) is not None:
            return forwarded
        return asdict(await engine.history(user, loop_id, limit, after or None))

    @router.post(
        "/loops/{loop_id}/choices/{choice_id}",
        status_code=202,
        response_model=Accepted,
        response_description=ACCEPTED,
        responses=error_responses(*LOOP, "invalid_choice_payload", "choice_not_found"),
        openapi_extra={"requestBody": {"required": True, "content": CHOICE_BODY}},
    )
    async def answer_choice(loop_id: str, choice_id: str, request: Request, user: Owner) -> Any:
        if (forwarded := await _elsewhere(request, loop_id)) is not None:
            return forwarded
        # Read here, after the owner check; None when the body is not JSON. The engine checks
        # the answer against the pending choice (CHOICE_ANSWER's shapes, and its question ids).
        body = await request.json()
        if not isinstance(body, dict):
            raise ApiError("invalid_choice_payload", "the body must be a JSON object")
        source = body.pop("source", "api")
        if not isinstance(source, str) or not 0 < len(source) <= 64:
            raise ApiError("invalid_choice_payload", "source must be a short string")
        by = _person(body.pop("by", None), "invalid_choice_payload")
        await engine.answer_choice(user, loop_id, choice_id, body, source, by)
        return Accepted()

    @router.post(
        "/loops/{loop_id}/view-links",
        status_code=201,
        response_model=ViewLink,
        responses=error_responses(*LOOP, *MALFORMED_JSON),
    )
    async def create_view_link(
        loop_id: str, request: Request, user: Owner, body: CreateViewLink | None = None
    ) -> Any:
        """[ext] A read-only link to the loop's page that ends after `days` (no body: the
        server's default)."""
        if hasattr(request.state, "invalid_json"):  # an optional body read as absent
            raise ApiError("invalid_json", f"the body is not JSON: {request.state.invalid_json}")
        url, expires_at = web.mint(request, loop_id, user, body.days if body else None)
        return ViewLink(url=url, expires_at=expires_at)

    @router.post(
        "/loops/{loop_id}/interrupt",
        status_code=202,
        response_model=Accepted,
        response_description=ACCEPTED,
        responses=error_responses(*LOOP, *MALFORMED_JSON),
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": openapi.model_body(InterruptBody),
            }
        },
    )
    async def interrupt(loop_id: str, request: Request, user: Owner) -> Any:
        if (forwarded := await _elsewhere(request, loop_id)) is not None:
            return forwarded
        # [ext] an optional body names who interrupted, for the audit trail.
        raw = await request.body()
        body = InterruptBody()
        if raw.strip():
            try:
                body = InterruptBody.model_validate_json(raw)
            except ValueError:
                raise ApiError(
                    "invalid_request", "the body must be {source?, by?: {id, name}}"
                ) from None
        by = body.by.model_dump() if body.by is not None else None
        await engine.interrupt(user, loop_id, body.source or "api", by)
        return Accepted()

    return router


def _person(raw: Any, code: str) -> dict[str, Any] | None:
    """An optional `{id, name?}` of a person, or the given error code."""
    if raw is None:
        return None
    try:
        return Author.model_validate(raw).model_dump()
    except ValueError:
        raise ApiError(code, "by must be {id, name}, each at most 200 characters") from None


def _usage_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["usage"], route_class=JSONRoute)

    @router.get(
        "/usage",
        response_model=UsageReport,
        responses=error_responses(*openapi.MALFORMED, "invalid_usage_query"),
    )
    async def usage(
        user: User,
        since: Annotated[str | None, Query(json_schema_extra=MOMENT)] = None,
        until: Annotated[str | None, Query(json_schema_extra=MOMENT)] = None,
        group_by: Annotated[str, Query(json_schema_extra=GROUPS)] = "day",
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

    @router.post(
        "/login",
        status_code=204,
        responses=error_responses(*MALFORMED_JSON, "invalid_credentials", auth=False),
        openapi_extra=PUBLIC,
    )
    async def login(body: Login, request: Request) -> Response:
        await request.app.state.auth.login(request, body.username, body.password)
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

    @router.post(
        "/logout", status_code=204, responses=error_responses(auth=False), openapi_extra=PUBLIC
    )
    async def logout(request: Request) -> Response:
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            check_same_origin(request)
            await engine.accounts.end_session(secret)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @router.post(
        "/me/tokens",
        status_code=201,
        response_model=TokenCreated,
        responses=error_responses(*MALFORMED_JSON),
        openapi_extra=SESSION_ONLY,
    )
    async def create_token(body: CreateToken, user: SessionUser) -> Any:
        info, token = await engine.accounts.create_token(user, body.label)
        return TokenCreated(
            tokenId=info.token_id, token=token, label=info.label, createdAt=info.created_at
        )

    @router.get(
        "/me/tokens",
        response_model=TokenList,
        responses=error_responses(),
        openapi_extra=SESSION_ONLY,
    )
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

    @router.delete(
        "/me/tokens/{token_id}",
        status_code=204,
        responses=error_responses("token_not_found"),
        openapi_extra=SESSION_ONLY,
    )
    async def revoke_token(token_id: str, user: SessionUser) -> Response:
        if not await engine.accounts.revoke_token(token_id, user):
            raise EngineError("token_not_found", f"no token {token_id}")
        return Response(status_code=204)

    return router


def _event_id(value: str) -> int:
    value = value.strip()
    # ASCII digits only (isdigit takes "²"), and few enough to fit a 64-bit integer.
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise ApiError("invalid_last_event_id", "Last-Event-ID must be an event id")
    return int(value)
