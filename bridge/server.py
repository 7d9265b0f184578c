"""The HTTP server: FastAPI app serving Loop API v1 under /api/v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from bridge import errors, web
from bridge.auth import (
    SESSION_COOKIE,
    Authenticator,
    LoginThrottle,
    RateLimiter,
    check_same_origin,
)
from bridge.errors import ApiError
from bridge.limits import BodyLimit, JSONRoute, file_upload
from bridge.schemas import (
    CONTENT_LIMIT,
    IDEMPOTENCY_KEY_LIMIT,
    METADATA_LIMIT,
    TITLE_LIMIT,
    ChoiceAnswer,
    CreateLoop,
    CreateToken,
    CreateViewLink,
    ErrorResponse,
    HistoryPage,
    Login,
    LoopDetail,
    LoopOut,
    LoopPage,
    SendMessage,
    TokenCreated,
    TokenList,
    TokenOut,
    ViewLink,
    metadata_size,
)
from bridge.sse import event_stream
from core.engine import Engine
from core.errors import EngineError

SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "events"}
}


async def _user(request: Request) -> str:
    return await request.app.state.auth.user(request)


async def _session_user(request: Request) -> str:
    return await request.app.state.auth.session_user(request)


User = Annotated[str, Depends(_user)]
SessionUser = Annotated[str, Depends(_session_user)]


async def _owner(loop_id: str, request: Request, user: User) -> str:
    """The caller, once the loop exists and is theirs: checked before anything else
    about the request (its body, query or headers)."""
    await request.app.state.engine.check_owner(user, loop_id)
    return user


Owner = Annotated[str, Depends(_owner)]


async def _reader(loop_id: str, request: Request, grant: str | None = None) -> str:
    """The owner, or [ext] a view link's `grant` for this loop: the read-only routes."""
    if grant is not None:
        return web.grant_reader(request, loop_id, grant)
    return await _owner(loop_id, request, await _user(request))


Reader = Annotated[str, Depends(_reader)]


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
    app.add_middleware(BodyLimit, limit=CONTENT_LIMIT * 2, streamed=file_upload)
    errors.install(app)
    app.state.engine = engine
    settings = engine.settings
    app.state.auth = Authenticator(
        engine.accounts,
        RateLimiter(settings.rate_limit_per_minute),
        LoginThrottle(settings.login_failures_per_name, settings.login_failures_per_address),
    )

    @app.get("/healthz", include_in_schema=False)
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

    app.include_router(_loop_routes(engine), prefix="/api/v1")
    app.include_router(_account_routes(engine), prefix="/api/v1")
    from bridge.files import file_routes  # it imports this module's dependencies

    app.include_router(file_routes(engine), prefix="/api/v1")
    web.mount(app, engine)
    return app


def _loop_routes(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["loops"], route_class=JSONRoute)

    @router.post("/loops", status_code=201, response_model=LoopOut, responses=_errors())
    async def create_loop(body: CreateLoop, user: User) -> Any:
        if len(body.title) > TITLE_LIMIT:
            raise ApiError("title_too_long", f"title is over {TITLE_LIMIT} characters")
        if metadata_size(body.metadata) > METADATA_LIMIT:
            raise ApiError("metadata_too_large", "metadata is over 16 KB as JSON")
        loop = await engine.create_loop(
            user, body.title, body.metadata, body.profiles, body.vault, body.repo, body.branch
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
        author = body.author.model_dump() if body.author is not None else None
        attachments = [a.path for a in body.attachments] if body.attachments else None
        stream = await engine.send(
            user,
            loop_id,
            body.content,
            body.permission_mode,
            idempotency_key or None,
            author,
            attachments=attachments,
        )
        return event_stream(stream.events, {"X-Turn-Id": stream.turn_id})

    @router.get(
        "/loops/{loop_id}/events",
        response_class=Response,
        responses={**SSE_RESPONSE, **_errors(403, 404)},
    )
    async def watch_loop(
        loop_id: str,
        user: Reader,
        last_event_id: Annotated[str | None, Header()] = None,
        resume_after: Annotated[
            str | None,
            Query(
                alias="last_event_id",
                description="[ext] where to resume when no Last-Event-ID header is sent "
                "(an EventSource cannot send one at first); the header wins",
            ),
        ] = None,
    ) -> Response:
        resume = None
        if last_event_id is None:
            last_event_id = resume_after
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
        user: Reader,
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
        await engine.answer_choice(user, loop_id, choice_id, body, source)
        return Response(status_code=202)

    @router.post(
        "/loops/{loop_id}/view-links",
        status_code=201,
        response_model=ViewLink,
        responses=_errors(403, 404),
    )
    async def create_view_link(
        loop_id: str, request: Request, user: Owner, body: CreateViewLink | None = None
    ) -> Any:
        """[ext] A read-only link to the loop's page that ends after `days`."""
        url, expires_at = web.mint(request, loop_id, user, body.days if body else None)
        return ViewLink(url=url, expires_at=expires_at)

    @router.post("/loops/{loop_id}/interrupt", status_code=202, responses=_errors(403, 404))
    async def interrupt(loop_id: str, user: Owner) -> Response:
        await engine.interrupt(user, loop_id)
        return Response(status_code=202)

    return router


def _account_routes(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["accounts"], route_class=JSONRoute)

    @router.post("/login", status_code=204, responses=_errors())
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

    @router.post("/logout", status_code=204)
    async def logout(request: Request) -> Response:
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            check_same_origin(request)
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
