"""Who is calling: a Bearer token or a browser session cookie; and how often they may."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fastapi import Request

from bridge.errors import ApiError
from core.accounts import Accounts

SESSION_COOKIE = "loopbridge_session"


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per user: `per_minute` requests a minute, bursts up to the same."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, Bucket] = {}

    def check(self, user: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.setdefault(user, Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self.rate)
            raise ApiError(
                "too_many_requests",
                f"too many requests; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        bucket.tokens -= 1


class Authenticator:
    def __init__(self, accounts: Accounts, limiter: RateLimiter) -> None:
        self.accounts = accounts
        self.limiter = limiter

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
        return user
