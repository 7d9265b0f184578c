"""The HTTP connection: uvicorn's httptools protocol with limits that hold under abuse.

uvicorn reads a request's head without bounds (httptools joins a long header piece by
piece, so one 64 MB header costs seconds of the one event loop), never times out a
client that trickles its head or body, and answers malformed HTTP in plain text. This
protocol counts the head's bytes as they arrive and refuses at 64 KB, times out the head
and the body, caps connections at accept time, and answers every refusal with the
contract's JSON error. `server_config` builds the uvicorn config that uses it, for
`loopbridge serve` and the tests alike.
"""

from __future__ import annotations

import asyncio
import json
import resource
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from bridge.server.errors import error_body
from bridge.server.sse import DRAIN
from core.config import Settings

# Paths served even when the server is at its connection cap, so health checks still see it.
PROBE_PATHS = frozenset({b"/healthz", b"/readyz"})
# File descriptors kept for everything but client connections: the database, agents' pipes.
OTHER_FILES = 512


@dataclass(frozen=True)
class HttpLimits:
    head_bytes: int = 64 * 1024  # request line and headers, in all
    url_bytes: int = 16 * 1024
    head_timeout: float = 10.0  # from the first byte of a request to the end of its head
    body_timeout: float = 60.0  # from the end of the head to the end of the body
    max_connections: int = 1000
    # Connections over the cap that may still ask PROBE_PATHS; any beyond are closed at once.
    probe_connections: int = 16
    # After a refusal, the client's remaining bytes are read and dropped this long, so it
    # reads the answer instead of a connection reset.
    linger: float = 2.0

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        """The settings' limits; the connection cap stays below what the process may open,
        so a flood of connections can never take the files the server itself needs."""
        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = files - OTHER_FILES if files != resource.RLIM_INFINITY else settings.max_connections
        return cls(
            head_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            max_connections=min(settings.max_connections, max(64, room)),
        )


class ServerConfig(uvicorn.Config):
    """A uvicorn config whose connections are `GuardedProtocol`s with these limits."""

    def __init__(self, app: Any, limits: HttpLimits, **options: Any) -> None:
        super().__init__(app, http=GuardedProtocol, ws="none", **options)
        self.limits = limits


def server_config(app: Any, settings: Settings, **options: Any) -> ServerConfig:
    options.setdefault("log_level", "warning")
    options.setdefault("lifespan", "off")
    return ServerConfig(app, HttpLimits.of(settings), **options)


class _Refusal(Exception):
    """Raised in a parser callback: the parser stops, and the connection answers this."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GuardedProtocol(HttpToolsProtocol):
    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.limits if isinstance(config, ServerConfig) else HttpLimits()
        self._reading_head = True
        self._head_size = 0  # bytes of the request line and the headers parsed so far
        self._unparsed = 0  # bytes fed since the parser last finished a piece of the head
        self._progress = False
        self._url_size = 0
        self._probe_only = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        # Set when the server shuts down: the event streams of this connection end then
        # (uvicorn would wait for them), each closing its response properly.
        self._drain = asyncio.Event()

    # ---- connections -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        over = len(self.connections) - self.limits.max_connections
        if over > self.limits.probe_connections:
            # Closed before reading a byte: the socket goes back to the system at once.
            self._refused = True
            transport.abort()
            return
        self._probe_only = over > 0
        self._arm(self._head_timeout(), self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the client's rest is dropped
        self._unset_keepalive_if_required()
        if self._reading_head and self._timer is None:
            self._arm(self._head_timeout(), self._head_timed_out)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.code, cause.message)
            else:
                self._refuse("invalid_http", f"the request is not valid HTTP/1.1: {exc}")
            return
        if not self._reading_head or self._refused:
            return
        # A piece of the head still arriving (one long header, say) is counted here:
        # the parser reports it only once it is whole.
        self._unparsed = 0 if self._progress else self._unparsed + len(data)
        self._progress = False
        if self._head_size + self._unparsed > self.limits.head_bytes:
            self._refuse("headers_too_large", self._too_large())

    def shutdown(self) -> None:
        self._drain.set()
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._refuse("invalid_http", msg)

    # ---- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})
        extensions[DRAIN] = {"event": self._drain}
        self._reading_head = True
        self._head_size = self._url_size = 0
        self._progress = True

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > self.limits.url_bytes:
            raise _Refusal("uri_too_long", f"the URL is over {self.limits.url_bytes} bytes")
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._progress = True
        self._disarm()
        if self._probe_only and httptools.parse_url(self.url).path not in PROBE_PATHS:
            raise _Refusal("server_busy", "the server has too many connections; retry soon")
        super().on_headers_complete()
        # Cancelled when the body is complete (at once for a request without one).
        self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True
        self._unparsed = 0
        super().on_message_complete()

    def _grow(self, size: int) -> None:
        self._progress = True
        self._head_size += size
        if self._head_size > self.limits.head_bytes:
            raise _Refusal("headers_too_large", self._too_large())

    def _too_large(self) -> str:
        return f"the request headers are over {self.limits.head_bytes // 1024} KB in all"

    # ---- timeouts ----------------------------------------------------------------------------

    def _head_timeout(self) -> float:
        # A connection over the cap gets a moment for a health check, no more.
        return min(self.limits.head_timeout, 2.0) if self._probe_only else self.limits.head_timeout

    def _arm(self, delay: float, then: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, then)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._reading_head and not self._refused:
            self._refuse("request_timeout", "the request head did not arrive in time")

    def _body_timed_out(self) -> None:
        self._timer = None
        if self._reading_head or self._refused:
            return
        if self.cycle.response_started:
            # Answered without reading the whole body: nothing more to say to this client.
            self._refused = True
            self.transport.close()
            return
        self._refuse("request_timeout", "the request body did not arrive in time")

    # ---- refusing ----------------------------------------------------------------------------

    def _refuse(self, code: str, message: str) -> None:
        """Answer with the contract's JSON error if no answer has begun, then close."""
        self._refused = True
        self._disarm()
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                transport.close()  # an answer is half sent: an error cannot follow it
                return
            # The app may still be running: it sees the client gone and writes nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        self.pipeline.clear()
        status, body = error_body(code, message)
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = [STATUS_LINE[status]]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\n" % len(payload))
        if code == "server_busy":
            head.append(b"retry-after: 1\r\n")
        head.append(b"connection: close\r\n\r\n")
        transport.write(b"".join(head) + payload)
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(self.limits.linger, transport.close)
