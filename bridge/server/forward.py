"""[ext] Several replicas: a request about a loop that another replica runs is answered by
that replica (its owner), whichever replica received it.

The request goes on with the caller's own credentials, unchanged, so the owner checks
them like any request; a header signed with a secret only the replicas have (a file in
the shared data directory) marks it as forwarded, so the owner answers it itself and
never forwards it again. A header from outside without the right signature means
nothing. A turn's stream relays the owner's bytes as they come; if the owner dies
mid-turn, the rest of the turn (its `error`, once the owner's lease expires) comes from
the event log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from bridge.contract.events import TERMINAL
from bridge.server.sse import encode
from core.engine import Engine
from core.ids import loop_id
from core.replicas import Replicas

FORWARDED = "x-loopbridge-forwarded"
SECRET_FILE = "replica-secret"
# Not passed on: they describe one connection, or are the forwarder's own.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "content-length",
        "proxy-authorization",
        "proxy-connection",
        FORWARDED,
    }
)
ANSWER_HEADERS = ("content-type", "retry-after", "x-turn-id", "cache-control", "x-accel-buffering")
CONNECT_SECONDS = 2.0
FRAME_END = re.compile(rb"\r?\n\r?\n")


def replica_secret(data_dir: Path) -> bytes:
    """The replicas' shared secret, made once by the first replica to start (atomically:
    written aside, then linked into place, so no replica reads half of it)."""
    path = data_dir / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    aside = data_dir / f".{SECRET_FILE}.{os.getpid()}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_hex(32).encode())
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # another replica's came first
    finally:
        aside.unlink()
    return path.read_bytes()


class Forwarder:
    def __init__(self, engine: Engine, replicas: Replicas) -> None:
        self.replicas = replicas
        self._secret = replica_secret(engine.settings.data_dir)
        timeout = httpx.Timeout(60.0, connect=CONNECT_SECONDS, read=None)
        self.http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    def _signature(self, method: str, path: str) -> str:
        return hmac.new(self._secret, f"{method} {path}".encode(), hashlib.sha256).hexdigest()

    def forwarded(self, request: Request) -> bool:
        """The request came from another replica (its signature is right)."""
        given = request.headers.get(FORWARDED)
        if given is None:
            return False
        return hmac.compare_digest(given, self._signature(request.method, request.url.path))

    async def elsewhere(
        self, request: Request, raw_id: str, stream: bool = False
    ) -> Response | None:
        """The owner's answer when another live replica runs the loop; None: answer here.
        An owner that does not answer is waited out until its lease expires."""
        if self.forwarded(request):
            return None
        loop = loop_id(raw_id)
        while True:
            url = await self.replicas.owner_elsewhere(loop)
            if url is None:
                return None
            try:
                return await self._send(request, url, loop, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                await self.replicas.wait_for_expiry(loop, url)

    async def _send(self, request: Request, url: str, loop: str, stream: bool) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers[FORWARDED] = self._signature(request.method, request.url.path)
        target = url.rstrip("/") + request.url.path
        upstream = self.http.build_request(
            request.method,
            target,
            params=request.url.query or None,
            headers=headers,
            content=await request.body(),
        )
        answer = await self.http.send(upstream, stream=stream)
        kept = {k: v for k, v in answer.headers.items() if k.lower() in ANSWER_HEADERS}
        is_stream = answer.headers.get("content-type", "").startswith("text/event-stream")
        if not stream or not is_stream:
            body = await answer.aread()
            await answer.aclose()
            return Response(body, answer.status_code, kept)
        turn = answer.headers.get("x-turn-id", "")
        return StreamingResponse(
            self._relay(answer, loop, turn), answer.status_code, kept, "text/event-stream"
        )

    async def _relay(self, answer: httpx.Response, loop: str, turn: str) -> AsyncIterator[bytes]:
        """The owner's stream as it comes; if it breaks before the turn's end, the rest of
        the turn from the event log."""
        frames = _Frames()
        try:
            async for chunk in answer.aiter_raw():
                frames.feed(chunk)
                yield chunk
        except httpx.HTTPError:
            pass
        finally:
            await answer.aclose()
        if frames.ended or not turn:
            return
        rest = self.replicas.follow_turn(loop, turn, frames.last_id)
        async with contextlib.aclosing(rest):
            async for batch in rest.batches():
                yield b"".join(encode(event) for event in batch)


class _Frames:
    """What a relayed SSE stream said so far: its last event id and whether it ended."""

    def __init__(self) -> None:
        self._buffer = b""
        self.last_id = 0
        self.ended = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *frames, self._buffer = FRAME_END.split(self._buffer)
        for frame in frames:
            for line in frame.splitlines():
                name, _, value = line.decode(errors="replace").partition(":")
                value = value.strip()
                if name == "id" and value.isdigit():
                    self.last_id = int(value)
                elif name == "event" and value in TERMINAL:
                    self.ended = True
