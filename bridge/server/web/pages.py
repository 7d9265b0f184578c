"""The page routes: `/login`, `/loops`, `/loops/{id}` (also read-only, by a view link).

Pages hold no state-changing form of their own: every change (log in, send,
answer, stop) is a same-origin JSON `fetch` to the Loop API by the page's
script, so the API's checks on cookie requests are the only CSRF gate there is
to get right. Every page carries a strict Content-Security-Policy: scripts and
styles only from this server's `/static`, no inline code.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import Scope

from bridge.contract.times import rfc3339
from bridge.server.errors import ApiError
from bridge.server.web.grants import GrantError, Keyring
from core.engine import Engine
from core.errors import EngineError

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
TEMPLATES.env.filters.update(
    isoformat=lambda moment: rfc3339(moment) or "",
    when=lambda moment: moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "–",
    usd=lambda amount: f"${amount:,.4f}" if amount < 1 else f"${amount:,.2f}",
)
LOOPS_PER_PAGE = 50
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # A view link's grant is in the page's URL: never hand it on to another site.
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI, engine: Engine) -> None:
    app.state.keyring = Keyring(engine.settings.data_dir)
    app.mount("/static", _Static(directory=HERE / "static"), name="static")
    app.include_router(_routes(engine))


def _page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    return TEMPLATES.TemplateResponse(
        request, name, context, status_code=status, headers=PAGE_HEADERS
    )


def _refused(request: Request, status: int, title: str, message: str) -> Response:
    return _page(request, "refused.html", status, title=title, message=message)


def _to_login(path: str) -> Response:
    return RedirectResponse(f"/login?next={quote(path)}", status_code=303, headers=PAGE_HEADERS)


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this server, nothing else."""
    if target.startswith("/") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/loops"


async def _session_user(request: Request) -> str | None:
    try:
        user: str | None = await request.app.state.auth.session_user(request)
    except ApiError as exc:
        if exc.code == "too_many_requests":
            raise
        return None
    return user


def _routes(engine: Engine) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> Response:
        return RedirectResponse("/loops", status_code=303, headers=PAGE_HEADERS)

    @router.get("/login")
    async def login(request: Request, next: str = "/loops", nojs: bool = False) -> Response:
        return _page(request, "login.html", next=safe_next(next), nojs=nojs)

    @router.post("/login")
    async def login_without_script() -> Response:
        # The form is sent by script, as JSON to the API; a browser without script lands here.
        return RedirectResponse("/login?nojs=1", status_code=303, headers=PAGE_HEADERS)

    @router.get("/loops")
    async def loops(request: Request, after: str | None = None) -> Response:
        user = await _session_user(request)
        if user is None:
            return _to_login("/loops")
        try:
            page = await engine.list_loops(user, LOOPS_PER_PAGE, after=after)
        except EngineError:
            page = await engine.list_loops(user, LOOPS_PER_PAGE)
        # The list has no runtime fields: each loop's detail says busy and what it cost.
        rows = [asdict(await engine.get_loop(user, loop.id)) for loop in page.data]
        more = page.last_id if page.has_more else None
        return _page(request, "loops.html", user=user, loops=rows, more=more)

    @router.get("/loops/{loop_id}")
    async def loop(request: Request, loop_id: str, grant: str | None = None) -> Response:
        if grant is not None:
            return await _viewed(request, loop_id, grant)
        user = await _session_user(request)
        if user is None:
            return _to_login(f"/loops/{loop_id}")
        try:
            found = await engine.get_loop(user, loop_id)
        except EngineError as exc:
            return _loop_refused(request, exc)
        return _page(request, "loop.html", user=user, loop=asdict(found), grant="", readonly=False)

    async def _viewed(request: Request, loop_id: str, grant: str) -> Response:
        keyring: Keyring = request.app.state.keyring
        try:
            granted = keyring.verify(grant, loop_id)
        except GrantError as exc:
            return _refused(request, 403, "This link cannot be used", str(exc))
        request.app.state.auth.limiter.check(f"view:{granted.loop_id}")
        try:
            found = await engine.get_loop(granted.owner, loop_id)
        except EngineError as exc:
            return _loop_refused(request, exc)
        return _page(
            request, "loop.html", user=None, loop=asdict(found), grant=grant, readonly=True
        )

    return router


def _loop_refused(request: Request, exc: EngineError) -> Response:
    if exc.code == "not_loop_owner":
        return _refused(request, 403, "Not your loop", "This loop belongs to another user.")
    return _refused(request, 404, "No such loop", "There is no loop with this id.")
