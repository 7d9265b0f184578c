"""An async client for Loop API v1, over HTTP or in-process.

The Slack and Discord adapters and other bots use it instead of speaking HTTP
themselves. Both streams resume after a dropped connection: `send` repeats its
POST with the same Idempotency-Key, `watch` reconnects with Last-Event-ID, and
neither yields an event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from pydantic import BaseModel, ValidationError

from bridge.client.asgi import ASGIApp, StreamingASGITransport
from bridge.contract.events import FRAMES, LOOP_EVENT, TERMINAL, LoopEvent
from bridge.contract.models import (
    Author,
    ErrorResponse,
    FileList,
    FileWritten,
    HistoryPage,
    LoopDetail,
    LoopOut,
    LoopPage,
    PermissionMode,
    TokenCreated,
    TokenList,
    UsageReport,
    ViewLink,
)

API_PREFIX = "/api/v1"
IN_PROCESS_URL = "http://loopbridge"
# The server pings every 15 s: three missed pings mean the connection is dead.
STREAM_IDLE_TIMEOUT = 50.0
# Answers worth another try: the server is busy or starting, or a proxy failed.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# A spent budget does not come back within a retry's wait.
NOT_RETRYABLE_CODES = frozenset({"budget_exceeded"})

Model = TypeVar("Model", bound=BaseModel)
Connect = Callable[[int | None], AsyncGenerator[LoopEvent, None]]


class LoopApiError(Exception):
    """A non-2xx answer, with the contract's error `type` and `code`."""

    def __init__(
        self, status: int, type: str, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(f"{status} {type}/{code}: {message}")
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        # Seconds, from a `Retry-After` header (429 answers).
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> LoopApiError:
        retry = response.headers.get("retry-after", "")
        retry_after = int(retry) if retry.isdigit() else None
        try:
            body = ErrorResponse.model_validate_json(response.content).error
        except ValidationError:
            text = response.text[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", f"http_{response.status_code}", text)
        return cls(response.status_code, body.type, body.code, body.message, retry_after)


@dataclass(frozen=True)
class Download:
    """A file being downloaded: its size and type, and its bytes as they arrive."""

    path: str
    size: int
    media_type: str
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks])


@dataclass(frozen=True)
class Reconnect:
    """How a broken stream is retried: `attempts` in a row without a new event."""

    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.first_delay * 2.0 ** (failures - 1))


class LoopClient:
    """Loop API v1. `base_url` is the server's root; requests go to `/api/v1` under it.

    Programs authenticate with `token`; a person can `login` instead, which keeps
    the session cookie in this client (the token endpoints take only that).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        cookies: httpx.Cookies | dict[str, str] | None = None,
        reconnect: Reconnect = Reconnect(),
    ) -> None:
        root = base_url.rstrip("/").removesuffix(API_PREFIX)
        self.token = token
        self.reconnect = reconnect
        self._http = httpx.AsyncClient(
            base_url=root + API_PREFIX, transport=transport, timeout=timeout, cookies=cookies
        )
        self._stream_timeout = httpx.Timeout(timeout, read=STREAM_IDLE_TIMEOUT)

    @classmethod
    def in_process(cls, app: ASGIApp, token: str | None = None, **options: Any) -> Self:
        """A client of an app in this event loop (its lifespan is the caller's to run)."""
        return cls(IN_PROCESS_URL, token, transport=StreamingASGITransport(app), **options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- loops ---------------------------------------------------------------------

    async def create_loop(
        self,
        *,
        title: str | None = None,
        metadata: dict[str, Any] | None = None,
        profiles: list[str] | None = None,
        vault: str | None = None,
        repo: str | None = None,
        branch: str | None = None,
    ) -> LoopOut:
        body = _given(
            title=title,
            metadata=metadata,
            profiles=profiles,
            vault=vault,
            repo=repo,
            branch=branch,
        )
        return await self._model(LoopOut, "POST", "/loops", json=body)

    async def list_loops(
        self,
        *,
        limit: int | None = None,
        after: str | None = None,
        before: str | None = None,
        archived: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> LoopPage:
        params = _given(limit=limit, after=after, before=before)
        if archived is not None:
            params["archived"] = "true" if archived else "false"
        params |= {f"metadata.{key}": value for key, value in (metadata or {}).items()}
        return await self._model(LoopPage, "GET", "/loops", params=params)

    async def find_loop(self, metadata: dict[str, str]) -> LoopOut | None:
        """The most recently active unarchived loop whose metadata has all these values."""
        page = await self.list_loops(limit=1, metadata=metadata)
        return page.data[0] if page.data else None

    async def get_loop(self, loop_id: str) -> LoopDetail:
        return await self._model(LoopDetail, "GET", _loop_path(loop_id))

    async def archive_loop(self, loop_id: str) -> None:
        await self._request("DELETE", _loop_path(loop_id))

    async def history(
        self, loop_id: str, *, limit: int | None = None, after: str | None = None
    ) -> HistoryPage:
        params = _given(limit=limit, after=after)
        return await self._model(HistoryPage, "GET", _loop_path(loop_id, "messages"), params=params)

    async def answer_choice(
        self,
        loop_id: str,
        choice_id: str,
        *,
        allow: bool | None = None,
        answers: dict[str, str | list[str]] | None = None,
        source: str | None = None,
        by: Author | None = None,
    ) -> None:
        """Answer a permission with `allow`, or a question with `answers` (question id → label);
        `by` [ext] names the person who answered, for history and audit."""
        if (allow is None) == (answers is None):
            raise ValueError("give exactly one of allow= or answers=")
        body = _given(allow=allow, answers=answers, source=source, by=_person(by))
        await self._request("POST", _loop_path(loop_id, "choices", choice_id), json=body)

    async def interrupt(
        self, loop_id: str, *, source: str | None = None, by: Author | None = None
    ) -> None:
        body = _given(source=source, by=_person(by))
        await self._request("POST", _loop_path(loop_id, "interrupt"), json=body or None)

    async def usage(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        group_by: str | None = None,
    ) -> UsageReport:
        """[ext] What the caller's loops cost; `since`/`until` are RFC 3339 times."""
        params = _given(since=since, until=until, group_by=group_by)
        return await self._model(UsageReport, "GET", "/usage", params=params)

    # ---- files [ext] ---------------------------------------------------------------

    async def list_files(self, loop_id: str, path: str = "") -> FileList:
        """One directory of the loop's working directory (its root by default)."""
        params = {"path": path} if path else {}
        return await self._model(FileList, "GET", _loop_path(loop_id, "files"), params=params)

    @contextlib.asynccontextmanager
    async def download_file(self, loop_id: str, path: str) -> AsyncIterator[Download]:
        """Stream one file: `async with client.download_file(loop, "out/a.csv") as d:` then
        `async for chunk in d.chunks` (or `await d.read()`). Errors come before the bytes."""
        request = self._http.build_request(
            "GET", _file_path(loop_id, path), headers=self._auth(), timeout=self._stream_timeout
        )
        response = await self._http.send(request, stream=True)
        try:
            if not response.is_success:
                await response.aread()
                raise LoopApiError.from_response(response)
            media_type = response.headers.get("content-type", "application/octet-stream")
            size = int(response.headers.get("content-length", "0"))
            yield Download(path, size, media_type.split(";")[0], response.aiter_bytes())
        finally:
            await response.aclose()

    async def upload_file(
        self, loop_id: str, path: str, content: bytes | AsyncIterable[bytes]
    ) -> FileWritten:
        """Write one file (parents made, an existing file replaced); `content` may be an
        async iterable of chunks, sent as it comes (at most 25 MiB in all)."""
        return await self._model(
            FileWritten,
            "PUT",
            _file_path(loop_id, path),
            content=content,
            timeout=self._stream_timeout,
        )

    async def create_view_link(self, loop_id: str, *, days: float | None = None) -> ViewLink:
        """[ext] A read-only link to the loop's page, for people who are not users."""
        body = _given(days=days)
        return await self._model(ViewLink, "POST", _loop_path(loop_id, "view-links"), json=body)

    # ---- streams -------------------------------------------------------------------

    def send(
        self,
        loop_id: str,
        content: str,
        *,
        permission_mode: PermissionMode | None = None,
        idempotency_key: str | None = "auto",
        author: Author | None = None,
        attachments: list[str] | None = None,
    ) -> AsyncGenerator[LoopEvent, None]:
        """Send a message and stream its turn until `done`, `interrupted` or `error`, as
        typed events (`bridge.contract.events`: `event.event`, `event.id`, `event.data`).

        `author` names the person a relaying bot speaks for; the agent is told who wrote it.

        With an Idempotency-Key (a fresh uuid4 by default) a broken stream is resumed
        by repeating the POST; the server replays the turn without running it again.
        `idempotency_key=None` sends none, and then a broken stream is not retried.
        `attachments` are paths of files already in the loop's working directory
        (`upload_file` puts them there); images among them reach the model as images.
        To leave early, close the iterator (`contextlib.aclosing`): that closes the
        connection at once, and the turn still runs to its end.
        """
        key = str(uuid.uuid4()) if idempotency_key == "auto" else idempotency_key
        headers = {"Idempotency-Key": key} if key is not None else {}
        body = _given(
            content=content,
            permission_mode=permission_mode,
            author=_person(author),
        )
        if attachments:
            body["attachments"] = [{"path": path} for path in attachments]
        path = _loop_path(loop_id, "messages")

        def connect(_: int | None) -> AsyncGenerator[LoopEvent, None]:
            return self._stream("POST", path, headers=headers, json=body)

        attempts = self.reconnect.attempts if key is not None else 0
        return self._resumable(connect, None, attempts, until_terminal=True)

    def watch(
        self, loop_id: str, last_event_id: int | None = None
    ) -> AsyncGenerator[LoopEvent, None]:
        """Every event of the loop from now on, or after `last_event_id`, until closed."""
        path = _loop_path(loop_id, "events")

        def connect(after: int | None) -> AsyncGenerator[LoopEvent, None]:
            headers = {"Last-Event-ID": str(after)} if after is not None else {}
            return self._stream("GET", path, headers=headers)

        return self._resumable(connect, last_event_id, self.reconnect.attempts)

    async def _resumable(
        self, connect: Connect, last_id: int | None, attempts: int, *, until_terminal: bool = False
    ) -> AsyncGenerator[LoopEvent, None]:
        """Yield each event once across reconnections; ids increase within a loop."""
        failures = 0
        while True:
            try:
                async with contextlib.aclosing(connect(last_id)) as events:
                    async for event in events:
                        if last_id is not None and event.id is not None and event.id <= last_id:
                            continue
                        failures = 0
                        last_id = event.id if event.id is not None else last_id
                        yield event
                        if until_terminal and event.event in TERMINAL:
                            return
                raise httpx.RemoteProtocolError("the stream ended before its last event")
            except (httpx.TransportError, LoopApiError) as exc:
                failures += 1
                if failures > attempts or not _retryable(exc):
                    raise
            await asyncio.sleep(self.reconnect.delay(failures))

    async def _stream(
        self, method: str, path: str, *, headers: dict[str, str], **options: Any
    ) -> AsyncGenerator[LoopEvent, None]:
        """The events of one connection, typed, without pings. An event this client does not
        know (from a newer server) is skipped."""
        async with aconnect_sse(
            self._http,
            method,
            path,
            headers=headers | self._auth(),
            timeout=self._stream_timeout,
            **options,
        ) as source:
            if not source.response.is_success:
                await source.response.aread()
                raise LoopApiError.from_response(source.response)
            async for sse in source.aiter_sse():
                if sse.event != "ping" and sse.event in FRAMES:
                    yield _event(sse)

    # ---- accounts ------------------------------------------------------------------

    async def login(self, username: str, password: str) -> None:
        """Start a session; its cookie stays in this client."""
        body = {"username": username, "password": password}
        await self._request("POST", "/login", json=body, bearer=False)

    async def logout(self) -> None:
        await self._request("POST", "/logout", bearer=False)

    # The token endpoints refuse Bearer tokens: they go with the session cookie only.

    async def create_token(self, label: str = "") -> TokenCreated:
        body = {"label": label}
        return await self._model(TokenCreated, "POST", "/me/tokens", json=body, bearer=False)

    async def list_tokens(self) -> TokenList:
        return await self._model(TokenList, "GET", "/me/tokens", bearer=False)

    async def revoke_token(self, token_id: str) -> None:
        await self._request("DELETE", f"/me/tokens/{quote(token_id, safe='')}", bearer=False)

    # ---- plumbing ------------------------------------------------------------------

    def _auth(self, bearer: bool = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if bearer and self.token else {}

    async def _request(
        self, method: str, path: str, *, bearer: bool = True, **options: Any
    ) -> httpx.Response:
        response = await self._http.request(method, path, headers=self._auth(bearer), **options)
        if not response.is_success:
            raise LoopApiError.from_response(response)
        return response

    async def _model(self, model: type[Model], method: str, path: str, **options: Any) -> Model:
        response = await self._request(method, path, **options)
        return model.model_validate_json(response.content)


def _loop_path(loop_id: str, *rest: str) -> str:
    return "/".join(["/loops", *(quote(part, safe="") for part in (loop_id, *rest))])


def _file_path(loop_id: str, path: str) -> str:
    """The URL path of a file: each segment quoted, and dot segments too, so that no HTTP
    library folds `a/../b` into another path; the server refuses them (`invalid_path`)."""
    segments = [
        quote(part, safe="") if part not in (".", "..") else part.replace(".", "%2E")
        for part in path.split("/")
    ]
    return _loop_path(loop_id, "files") + "/" + "/".join(segments)


def _given(**values: Any) -> dict[str, Any]:
    """The arguments the caller gave, so that the server's defaults apply to the rest."""
    return {key: value for key, value in values.items() if value is not None}


def _event(sse: ServerSentEvent) -> LoopEvent:
    resume = int(sse.id) if sse.id else None
    return LOOP_EVENT.validate_python({"event": sse.event, "id": resume, "data": sse.json()})


def _retryable(exc: httpx.TransportError | LoopApiError) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return exc.status in RETRYABLE_STATUSES and exc.code not in NOT_RETRYABLE_CODES


def _person(person: Author | None) -> dict[str, str] | None:
    return person.model_dump() if person is not None else None
