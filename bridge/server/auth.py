"""Who is calling: a Bearer token or a browser session cookie; and how often they may."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

from fastapi import Request

from bridge.server.errors import ApiError
from core.accounts import Accounts
from core.rates import SharedRates

SESSION_COOKIE = "loopbridge_session"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a browser says of a request its own page made (or the person typed).
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per user: `per_minute` requests a minute, bursts up to the same;
    with replicas (`shared`), also `per_minute` a minute across all of them."""

    def __init__(self, per_minute: int, shared: SharedRates | None = None) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.shared = shared
        self._buckets: dict[str, Bucket] = {}

    def check(self, user: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.setdefault(user, Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            _too_many(math.ceil((1 - bucket.tokens) / self.rate))
        if self.shared is not None and (wait := self.shared.take(user)) is not None:
            _too_many(wait)
        bucket.tokens -= 1


def _too_many(wait: int) -> NoReturn:
    raise ApiError(
        "too_many_requests",
        f"too many requests; retry in {wait} s",
        headers={"Retry-After": str(wait)},
    )


class LoginThrottle:
    """Failed logins per name and per client address in a sliding window, in memory.

    Past either limit, logins (right or wrong) are refused with 429 until the oldest
    failure leaves the window, so guessing costs an attacker time, not the server.
    """

    def __init__(
        self, per_name: int = 5, per_address: int = 20, window: float = 60.0, keys: int = 10_000
    ) -> None:
        self.limits = {"name": per_name, "address": per_address}
        self.window = window
        self.keys = keys  # failures kept for this many names and addresses at most
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def check(self, name: str, address: str) -> None:
        now = time.monotonic()
        wait = 0.0
        for key in (("name", name), ("address", address)):
            failures = self._recent(key, now)
            if failures is not None and len(failures) >= self.limits[key[0]]:
                wait = max(wait, failures[0] + self.window - now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                "too_many_requests",
                f"too many failed logins; retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    def failed(self, name: str, address: str) -> None:
        now = time.monotonic()
        for key in (("name", name), ("address", address)):
            failures = self._recent(key, now)
            if failures is None:
                failures = self._failures[key] = deque()
            failures.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.keys:
            self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        self._failures.pop(("name", name), None)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures


def check_same_origin(request: Request) -> None:
    """Refuse a browser request that another site's page made (cross-site request forgery).

    `Origin` must name this server's own host, or else `Sec-Fetch-Site` must say the
    request came from this site or from the person. A request with neither header did
    not come from a modern browser's page (they send `Origin` on every POST) and passes.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        if not _same_host(origin, request.headers.get("host", "")):
            raise ApiError("csrf_failed", "Origin is not this server: request refused")
        return
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in SAME_SITE_FETCHES:
        raise ApiError("csrf_failed", "the request came from another site: refused")


def _same_host(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # e.g. "null", from a sandboxed frame or a file
    default = 443 if parts.scheme == "https" else 80
    mine = urlsplit(f"//{host.strip()}")
    try:
        my_port = mine.port
    except ValueError:
        return False
    return parts.hostname == mine.hostname and (port or default) == (my_port or default)


def _check_browser_request(request: Request) -> None:
    """With a session cookie, unsafe methods must come from this site, with JSON bodies."""
    if request.method not in UNSAFE_METHODS:
        return
    check_same_origin(request)
    has_body = request.headers.get("transfer-encoding") is not None or request.headers.get(
        "content-length", "0"
    ) not in ("", "0")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if has_body and media_type != "application/json":
        raise ApiError(
            "unsupported_media_type", "with a session cookie, a request body must be JSON"
        )


class Authenticator:
    def __init__(
        self, accounts: Accounts, limiter: RateLimiter, logins: LoginThrottle | None = None
    ) -> None:
        self.accounts = accounts
        self.limiter = limiter
        self.logins = logins or LoginThrottle()

    async def user(self, request: Request) -> str:
        """The caller, by Bearer token or session cookie (the dependency of loop routes)."""
        header = request.headers.get("authorization")
        if header is not None:
            user = await self._bearer(header)
        else:
            user = await self._session(request)
        self.limiter.check(user)
        return user

    async def session_user(self, request: Request) -> str:
        """The caller by session cookie only: a token may not mint more tokens."""
        if request.headers.get("authorization") is not None:
            raise ApiError(
                "missing_credentials", "token management takes a browser session, not a token"
            )
        user = await self._session(request)
        self.limiter.check(user)
        return user

    async def _bearer(self, header: str) -> str:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError("invalid_token", "use Authorization: Bearer la_<48 hex characters>")
        user = await self.accounts.user_for_token(token.strip())
        if user is None:
            raise ApiError("invalid_token", "the token is unknown or revoked")
        return user

    async def _session(self, request: Request) -> str:
        secret = request.cookies.get(SESSION_COOKIE)
        if not secret:
            raise ApiError("missing_credentials", "send a Bearer token or log in")
        user = await self.accounts.user_for_session(secret)
        if user is None:
            raise ApiError("invalid_token", "the session has ended; log in again")
        _check_browser_request(request)
        return user

    async def login(self, request: Request, name: str, password: str) -> None:
        """Check a login, throttled per name and per client address."""
        check_same_origin(request)
        address = request.client.host if request.client else ""
        self.logins.check(name, address)
        if not await self.accounts.check_password(name, password):
            self.logins.failed(name, address)
            raise ApiError("invalid_credentials", "wrong user name or password")
        self.logins.succeeded(name)
