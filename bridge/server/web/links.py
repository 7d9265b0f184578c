"""View links through the API: minting one for a loop, and reading a loop with one."""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import quote

from fastapi import Request

from bridge.server.errors import ApiError
from bridge.server.web.grants import GrantError, Keyring
from core.ids import loop_id as full_loop_id
from core.ids import utcnow


def keyring(request: Request) -> Keyring:
    ring: Keyring = request.app.state.keyring
    return ring


def mint(
    request: Request, raw_loop_id: str, owner: str, days: float | None
) -> tuple[str, datetime]:
    """A view link's URL (on `LOOPBRIDGE_PUBLIC_URL`, else this request's base) and its end."""
    settings = request.app.state.engine.settings
    loop = full_loop_id(raw_loop_id)
    expires_at = (utcnow() + timedelta(days=days or settings.view_link_days)).replace(microsecond=0)
    grant = keyring(request).mint(loop, owner, expires_at)
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    return f"{base}/loops/{loop}?grant={quote(grant)}", expires_at


def grant_reader(request: Request, raw_loop_id: str, grant: str) -> str:
    """The loop's owner, on whose behalf a view link reads (only history and events)."""
    try:
        granted = keyring(request).verify(grant, raw_loop_id)
    except GrantError as exc:
        raise ApiError("invalid_view_link", str(exc)) from None
    request.app.state.auth.limiter.check(f"view:{granted.loop_id}")
    return granted.owner
