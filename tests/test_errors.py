"""Loop API v1 errors: every 4xx of the contract, and no 5xx for any request, however malformed.

Each check asserts what a client sees: the HTTP status and the JSON `error.type` / `error.code`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.server.auth import SESSION_COOKIE
from core.accounts import TOKEN_TRUST_SECONDS, Accounts
from tests.conftest import Server, start_server, stop_server
from tests.polling import until_async
from tests.sse import TERMINAL, Ev, events, names

MB = 1024 * 1024
API = "/api/v1"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
UNKNOWN_LOOP = "loop_" + "0" * 24
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
# A stream that should have been a JSON refusal must fail the test, not hang it.
TIMEOUT = httpx.Timeout(20)


# ---- what a client sees ---------------------------------------------------------------


def _describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url} -> {r.status_code} {r.text[:300]!r}"


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The `error` object of an error answer, after checking the contract's shape."""
    assert r.headers.get("content-type", "").startswith("application/json"), _describe(r)
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, _describe(r)
    error = body["error"]
    for key in ("type", "code", "message"):
        assert isinstance(error.get(key), str) and error[key], _describe(r)
    return error


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, _describe(r)
    error = error_of(r)
    assert (error["type"], error["code"]) == (ERROR_TYPES[status], code), _describe(r)


def assert_clean(r: httpx.Response) -> None:
    """Any answer at all: below 500, and an error is the contract's JSON error."""
    assert r.status_code < 500, _describe(r)
    if r.status_code >= 400:
        assert error_of(r)["type"] == ERROR_TYPES.get(r.status_code), _describe(r)


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b'{"metadata": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


async def new_loop(http: httpx.AsyncClient, **body: Any) -> str:
    r = await http.post("/loops", json=body)
    assert r.status_code == 201, _describe(r)
    return r.json()["id"]


@dataclass
class World:
    """Alice's loops, and clients for the other people in these tests."""

    loop: str  # alice's, idle
    archived: str  # alice's, archived
    root: httpx.AsyncClient  # alice, at the server root (paths start with /api/v1)
    bob: httpx.AsyncClient
    anon: httpx.AsyncClient


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def world(server: Server) -> AsyncIterator[World]:
    loop = await new_loop(server.http, title="errors")
    archived = await new_loop(server.http, title="archived")
    r = await server.http.delete(f"/loops/{archived.removeprefix('loop_')}")
    assert r.status_code == 204, _describe(r)
    root = httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=TIMEOUT
    )
    bob = server.client(await server.token_for("bob"))
    anon = server.client()
    yield World(loop, archived, root, bob, anon)
    for client in (root, bob, anon):
        await client.aclose()


def session_client(server: Server, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url + API, headers={"Cookie": f"{SESSION_COOKIE}={secret}"}, timeout=TIMEOUT
    )


async def login(server: Server, user: str, password: str) -> str:
    async with httpx.AsyncClient(base_url=server.url + API) as http:
        r = await http.post("/login", json={"username": user, "password": password})
    assert r.status_code == 204, _describe(r)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie, cookie
    return r.cookies[SESSION_COOKIE]


async def read_until(stream: AsyncIterator[Ev], name: str) -> list[Ev]:
    seen = []
    async for ev in stream:
        if ev.name == "ping":
            continue
        seen.append(ev)
        if ev.name == name or ev.name in TERMINAL:
            break
    assert seen and seen[-1].name == name, names(seen)
    return seen


# ---- public pages and the OpenAPI document --------------------------------------------

CONTRACT_ENDPOINTS = {
    ("post", "/loops"),
    ("get", "/loops"),
    ("get", "/loops/{loop_id}"),
    ("delete", "/loops/{loop_id}"),
    ("post", "/loops/{loop_id}/messages"),
    ("get", "/loops/{loop_id}/events"),
    ("get", "/loops/{loop_id}/messages"),
    ("post", "/loops/{loop_id}/choices/{choice_id}"),
    ("post", "/loops/{loop_id}/interrupt"),
    ("post", "/login"),
    ("post", "/logout"),
    ("post", "/me/tokens"),
    ("get", "/me/tokens"),
    ("delete", "/me/tokens/{token_id}"),
}
WITH_BODY = {
    ("post", "/loops"): "title",
    ("post", "/loops/{loop_id}/messages"): "content",
    ("post", "/loops/{loop_id}/choices/{choice_id}"): "allow",
    ("post", "/login"): "username",
    ("post", "/me/tokens"): "label",
}


async def test_healthz_and_docs_answer_without_auth(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        health = await http.get("/healthz")
        spec = await http.get(f"{API}/openapi.json")
        docs = await http.get(f"{API}/docs")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "openapi.json" in docs.text


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


async def test_openapi_describes_every_endpoint_body_and_error(server: Server) -> None:
    doc = (await server.http.get("/openapi.json")).json()
    documented = {
        (method, path.removeprefix(API)) for path, item in doc["paths"].items() for method in item
    }
    assert documented >= CONTRACT_ENDPOINTS, CONTRACT_ENDPOINTS - documented
    for method, path in CONTRACT_ENDPOINTS:
        operation = doc["paths"][API + path][method]
        responses = operation["responses"]
        errors = {"401"} if path == "/logout" or path == "/login" else {"400", "401", "429"}
        if "{loop_id}" in path:
            errors |= {"403", "404"}
        if path == "/loops/{loop_id}/messages" and method == "post":
            errors |= {"409"}
        if path == "/me/tokens/{token_id}":
            errors |= {"404"}
        if path != "/logout":
            assert errors <= set(responses), (method, path, sorted(responses))
        for status in set(responses) & set(map(str, ERROR_TYPES)):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert set(_resolve(doc, schema)["properties"]) == {"error"}, (method, path, status)
        if (method, path) in WITH_BODY:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert WITH_BODY[method, path] in _resolve(doc, body)["properties"], (method, path)
    streams = ("/loops/{loop_id}/events", "/loops/{loop_id}/messages")
    for method, path in (("get", streams[0]), ("post", streams[1])):
        assert (
            "text/event-stream" in doc["paths"][API + path][method]["responses"]["200"]["content"]
        )
    params = {p["name"] for p in doc["paths"][f"{API}/loops"]["get"]["parameters"]}
    assert {"limit", "after", "before", "archived"} <= params


# ---- 400: the contract's own codes ------------------------------------------------------


@dataclass(frozen=True)
class Send:
    name: str
    body: dict[str, Any]
    code: str  # all are 400
    archived: bool = False  # to the archived loop: passing every check ends at loop_archived
    key: str | None = None  # Idempotency-Key


HI = {"content": "hi"}
PERMISSION_MODES = ["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk", "auto"]
SEND_CASES = [
    Send("content absent", {}, "missing_content"),
    Send("content empty", {"content": ""}, "missing_content"),
    Send("content absent, mode given", {"permission_mode": "plan"}, "missing_content"),
    Send("content over 1 MB", {"content": "x" * (MB + 1)}, "content_too_large"),
    Send("content over 1 MB as UTF-8", {"content": "é" * (MB // 2 + 1)}, "content_too_large"),
    Send("content of exactly 1 MB", {"content": "x" * MB}, "loop_archived", archived=True),
    Send("mode unknown", {**HI, "permission_mode": "yolo"}, "invalid_permission_mode"),
    Send("mode in another case", {**HI, "permission_mode": "Default"}, "invalid_permission_mode"),
    Send("mode not a string", {**HI, "permission_mode": 1}, "invalid_permission_mode"),
    Send("key of 257 chars", HI, "idempotency_key_too_long", key="k" * 257),
    Send("key of 256 chars", HI, "loop_archived", archived=True, key="k" * 256),
    *(
        Send(f"mode {mode}", {**HI, "permission_mode": mode}, "loop_archived", archived=True)
        for mode in PERMISSION_MODES
    ),
]


@pytest.mark.parametrize("case", SEND_CASES, ids=lambda case: case.name)
async def test_send_message_refusals(server: Server, world: World, case: Send) -> None:
    loop = world.archived if case.archived else world.loop
    # Sent as UTF-8, not as \u escapes, so that 1 MB of content is 1 MB of body.
    content = json.dumps(case.body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json"}
    if case.key is not None:
        headers["Idempotency-Key"] = case.key
    r = await server.http.post(
        f"/loops/{loop}/messages", content=content, headers=headers, timeout=TIMEOUT
    )
    assert_error(r, 400, case.code)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"title": "t" * 200}, 201, None),
        ({"title": "t" * 201}, 400, "title_too_long"),
        ({"title": "é" * 200}, 201, None),  # characters, not bytes
        ({"metadata": {"k": "v" * (16 * 1024 - len('{"k":""}'))}}, 201, None),
        ({"metadata": {"k": "v" * (16 * 1024 - len('{"k":""}') + 1)}}, 400, "metadata_too_large"),
        ({"metadata": {f"k{i}": i for i in range(3000)}}, 400, "metadata_too_large"),
    ],
    ids=[
        "title-200",
        "title-201",
        "title-200-wide",
        "metadata-16KB",
        "metadata-16KB+1",
        "metadata-many-keys",
    ],
)
async def test_create_loop_limits(
    server: Server, body: dict[str, Any], status: int, code: str | None
) -> None:
    r = await server.http.post("/loops", json=body)
    if code is None:
        assert r.status_code == status, _describe(r)
        assert {k: r.json()[k] for k in body} == body
    else:
        assert_error(r, status, code)


async def test_archived_loop_refuses_messages(server: Server, world: World) -> None:
    again = await server.http.delete(f"/loops/{world.archived}")
    assert again.status_code == 204, _describe(again)
    loop = (await server.http.get(f"/loops/{world.archived}")).json()
    assert loop["archived"] is True and RFC3339_UTC.fullmatch(loop["archived_at"])
    r = await server.http.post(f"/loops/{world.archived}/messages", json={"content": "hello"})
    assert_error(r, 400, "loop_archived")


async def test_idempotency_key_reused_with_another_body(server: Server, world: World) -> None:
    loop = await new_loop(server.http, title="idempotent")
    key = "clé ☃ ключ".encode()  # sent as raw UTF-8 bytes
    evs = await _turn(server.http, loop, {"content": "hello"}, key)
    assert names(evs)[0] == "started" and names(evs)[-1] == "done", names(evs)
    replay = await _turn(server.http, loop, {"content": "hello"}, key)
    assert [(e.name, e.data, e.id) for e in replay] == [(e.name, e.data, e.id) for e in evs]
    assert (await server.http.get(f"/loops/{loop}")).json()["turn_count"] == 1
    other = await new_loop(server.http, title="other")
    for target, body in [
        (loop, {"content": "hello again"}),
        (loop, {"content": "hello", "permission_mode": "plan"}),
        (other, {"content": "hello"}),
    ]:
        r = await server.http.post(
            f"/loops/{target}/messages", json=body, headers={"Idempotency-Key": key}
        )
        assert_error(r, 409, "idempotency_key_reused")


async def _turn(http: httpx.AsyncClient, loop: str, body: dict[str, Any], key: bytes) -> list[Ev]:
    stream = events(
        http, "POST", f"/loops/{loop}/messages", json=body, headers={"Idempotency-Key": key}
    )
    try:
        return await read_until(stream, "done")
    finally:
        await stream.aclose()


BAD_ANSWERS: list[tuple[str, bytes]] = [
    ("allow-string", as_json({"allow": "yes"})),
    ("empty-object", as_json({})),
    ("answers-string", as_json({"answers": "B"})),
    ("answers-to-a-permission", as_json({"answers": {"q1": "B"}})),
    ("allow-null", as_json({"allow": None})),
    ("allow-number", as_json({"allow": 1})),
    ("allow-and-more", as_json({"allow": True, "answers": {}})),
    ("unknown-field", as_json({"allow": True, "colour": "red"})),
    ("source-empty", as_json({"allow": True, "source": ""})),
    ("source-long", as_json({"allow": True, "source": "s" * 65})),
    ("source-number", as_json({"allow": True, "source": 5})),
    ("array", as_json([{"allow": True}])),
    ("string", as_json("allow")),
    ("number", as_json(1)),
    ("null", as_json(None)),
    ("true", as_json(True)),
    ("malformed", b'{"allow": tru'),
    ("empty-body", b""),
    ("not-utf8", b'{"allow": "\xff"}'),
    ("nan", b'{"allow": NaN}'),
]


async def test_choice_answers(server: Server, world: World) -> None:
    loop = await new_loop(server.http, title="choices")
    stream = events(
        server.http,
        "POST",
        f"/loops/{loop}/messages",
        json={"content": "[[bash: echo hi > f.txt]]", "permission_mode": "default"},
    )
    try:
        seen = await read_until(stream, "requires_choice")
        choice = seen[-1].data["choice_id"]
        url = f"/loops/{loop}/choices/{choice}"
        for name, body in BAD_ANSWERS:
            r = await server.http.post(
                url, content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400, (name, _describe(r))
            assert_error(r, 400, "invalid_choice_payload")
        # Owner and existence come before the body, and before the choice.
        assert_error(await world.bob.post(url, json={"allow": True}), 403, "not_loop_owner")
        assert_error(await world.bob.post(url, content=b"[]"), 403, "not_loop_owner")
        assert_error(
            await server.http.post(f"/loops/{UNKNOWN_LOOP}/choices/{choice}", json={"allow": True}),
            404,
            "loop_not_found",
        )
        assert_error(
            await server.http.post(f"/loops/{world.loop}/choices/{choice}", json={"allow": True}),
            404,
            "choice_not_found",
        )
        assert_error(
            await server.http.post(f"/loops/{loop}/choices/choice_nope", json={"allow": True}),
            404,
            "choice_not_found",
        )
        current = (await server.http.get(f"/loops/{loop}")).json()["current_turn"]
        assert current["pending_choice_id"] == choice  # no bad answer touched it
        r = await server.http.post(url, json={"allow": True})
        assert r.status_code == 202, _describe(r)
        assert_error(await server.http.post(url, json={"allow": True}), 404, "choice_not_found")
        rest = await read_until(stream, "done")
    finally:
        await stream.aclose()
    resolved = [e.data for e in rest if e.name == "choice_resolved"]
    assert resolved == [{"choice_id": choice, "source": "api"}]
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [c["answer"] for c in history[-1]["choices"]] == [{"allow": True}]
    # A choice that is no longer pending is 404 whatever the body.
    assert_error(await server.http.post(url, json={"allow": "yes"}), 404, "choice_not_found")


# ---- 401: credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    name: str
    headers: dict[str, str | bytes]
    status: int
    code: str | None
    path: str = "/loops"
    method: str = "GET"


def auth_cases(token: str) -> list[Auth]:
    bearer = {"Authorization": f"Bearer {token}"}
    return [
        Auth("nothing", {}, 401, "missing_credentials"),
        Auth("empty header", {"Authorization": ""}, 401, "invalid_token"),
        Auth("scheme only", {"Authorization": "Bearer"}, 401, "invalid_token"),
        Auth("basic", {"Authorization": "Basic YWxpY2U6cHc="}, 401, "invalid_token"),
        Auth("other scheme", {"Authorization": f"Token {token}"}, 401, "invalid_token"),
        Auth("no scheme", {"Authorization": token}, 401, "invalid_token"),
        Auth("short", {"Authorization": "Bearer la_abc"}, 401, "invalid_token"),
        Auth("unknown", {"Authorization": "Bearer la_" + "0" * 48}, 401, "invalid_token"),
        Auth("upper case", {"Authorization": f"Bearer {token.upper()}"}, 401, "invalid_token"),
        Auth("huge", {"Authorization": "Bearer la_" + "a" * 8000}, 401, "invalid_token"),
        Auth("latin-1", {"Authorization": "Bearer la_é".encode("latin-1")}, 401, "invalid_token"),
        Auth("utf-8", {"Authorization": "Bearer la_☃".encode()}, 401, "invalid_token"),
        Auth("unknown session", {"Cookie": f"{SESSION_COOKIE}=nope"}, 401, "invalid_token"),
        Auth("empty session", {"Cookie": f"{SESSION_COOKIE}="}, 401, "missing_credentials"),
        Auth("garbage cookie", {"Cookie": "=;;=; a; ;"}, 401, "missing_credentials"),
        Auth("scheme in lower case", {"Authorization": f"bearer {token}"}, 200, None),
        Auth("loop endpoint", {}, 401, "missing_credentials", f"/loops/{UNKNOWN_LOOP}"),
        # Token management takes a session cookie only: a token is no credential there.
        Auth("token create", bearer, 401, "missing_credentials", "/me/tokens", "POST"),
        Auth("token list", bearer, 401, "missing_credentials", "/me/tokens"),
        Auth("token revoke", bearer, 401, "missing_credentials", "/me/tokens/tok_0", "DELETE"),
    ]


async def test_auth_refusals(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url + API, timeout=TIMEOUT) as http:
        for case in auth_cases(server.token):
            kwargs: dict[str, Any] = {"json": {"label": "x"}} if case.method == "POST" else {}
            r = await http.request(case.method, case.path, headers=case.headers, **kwargs)
            assert r.status_code == case.status, (case.name, _describe(r))
            if case.code is not None:
                assert_error(r, case.status, case.code)


async def test_revoked_token(server: Server) -> None:
    info, token = await server.engine.accounts.create_token("alice", "soon revoked")
    async with server.client(token) as http:
        assert (await http.get("/loops")).status_code == 200
        await server.engine.accounts.revoke_token(info.token_id)
        assert_error(await http.get("/loops"), 401, "invalid_token")


async def test_a_token_revoked_elsewhere_stops_working_within_the_trust_window(
    server: Server,
) -> None:
    info, token = await server.engine.accounts.create_token("alice", "revoked by the CLI")
    clock = asyncio.get_running_loop().time
    async with server.client(token) as http:
        trusted_at = clock()
        assert (await http.get("/loops")).status_code == 200  # now trusted for a while
        # What `loopbridge tokens revoke` does from its own process: the same rows.
        assert await Accounts(server.engine.db).revoke_token(info.token_id)
        # The other process cannot tell this one: the token's trust runs out instead.
        answer = await until_async(
            lambda: http.get("/loops"),
            lambda r: r.status_code != 200,
            within=TOKEN_TRUST_SECONDS + 30,
            what="the revoked token to be refused",
        )
        assert_error(answer, 401, "invalid_token")
        assert clock() - trusted_at < TOKEN_TRUST_SECONDS + 5  # the window, and a poll's time


# ---- login, sessions and token management -------------------------------------------------


async def test_login_tokens_and_logout(server: Server) -> None:
    accounts = server.engine.accounts
    await accounts.add_user("carol", "carol's password")
    await accounts.add_user("dave", "dave's password")
    async with httpx.AsyncClient(base_url=server.url + API) as anon:
        for body in [
            {"username": "carol", "password": "wrong"},
            {"username": "nobody", "password": "carol's password"},
            {"username": "alice", "password": ""},  # a user without a password
        ]:
            assert_error(await anon.post("/login", json=body), 401, "invalid_credentials")
        for body in [{"username": "carol"}, {"username": 1, "password": "x"}, ["carol"]]:
            assert_error(await anon.post("/login", json=body), 400, "invalid_request")
        assert_error(await anon.get("/me/tokens"), 401, "missing_credentials")

    carol_secret = await login(server, "carol", "carol's password")
    dave_secret = await login(server, "dave", "dave's password")
    async with (
        session_client(server, carol_secret) as carol,
        session_client(server, dave_secret) as dave,
    ):
        r = await carol.post("/me/tokens", json={"label": "ci bot"})
        assert r.status_code == 201, _describe(r)
        created = r.json()
        assert set(created) == {"tokenId", "token", "label", "createdAt"}
        assert re.fullmatch(r"tok_[0-9a-f]{12}", created["tokenId"])
        assert re.fullmatch(r"la_[0-9a-f]{48}", created["token"])
        assert created["label"] == "ci bot" and RFC3339_UTC.fullmatch(created["createdAt"])
        token_id = created["tokenId"]
        assert_error(await carol.post("/me/tokens", json={"label": 5}), 400, "invalid_request")
        assert_error(
            await carol.post("/me/tokens", json={"label": "l" * 201}), 400, "invalid_request"
        )

        async with server.client(created["token"]) as bot:
            assert (await bot.get("/loops")).status_code == 200
            # The bot's token does not open token management, not even next to a session.
            both = {"Cookie": f"{SESSION_COOKIE}={carol_secret}"}
            assert_error(await bot.get("/me/tokens", headers=both), 401, "missing_credentials")

            listed = (await carol.get("/me/tokens")).json()["tokens"]
            assert [t["tokenId"] for t in listed] == [token_id]
            assert (
                {"tokenId", "label", "createdAt"}
                <= set(listed[0])
                <= {"tokenId", "label", "createdAt", "lastUsedAt"}
            )
            assert (await dave.get("/me/tokens")).json() == {"tokens": []}
            assert_error(await dave.delete(f"/me/tokens/{token_id}"), 404, "token_not_found")
            assert (await bot.get("/loops")).status_code == 200  # dave could not revoke it
            assert_error(await carol.delete("/me/tokens/tok_000000000000"), 404, "token_not_found")
            assert_error(await carol.delete(f"/me/tokens/{'t' * 5000}"), 404, "token_not_found")

            r = await carol.delete(f"/me/tokens/{token_id}")
            assert r.status_code == 204, _describe(r)
            assert_error(await carol.delete(f"/me/tokens/{token_id}"), 404, "token_not_found")
            assert_error(await bot.get("/loops"), 401, "invalid_token")
            assert (await carol.get("/me/tokens")).json() == {"tokens": []}

        r = await carol.post("/logout")
        assert r.status_code == 204, _describe(r)
        assert f"{SESSION_COOKIE}=" in r.headers.get("set-cookie", "")
        assert_error(await carol.get("/me/tokens"), 401, "invalid_token")  # the old cookie
        assert (await dave.get("/me/tokens")).status_code == 200  # other sessions go on


# ---- 403 and 404 on every loop endpoint ---------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {id} is the loop
    good: dict[str, Any]  # a well-formed request
    bad: dict[str, Any]  # wrong in some other way too: owner and existence still come first


LOOP_ENDPOINTS = [
    Endpoint("GET", "/loops/{id}", {}, {"params": {"limit": "abc"}}),
    Endpoint("DELETE", "/loops/{id}", {}, {"content": b"junk"}),
    Endpoint(
        "POST",
        "/loops/{id}/messages",
        {"json": {"content": "hello"}},
        {
            "content": b'{"content": ',
            "headers": {"Content-Type": "application/json", "Idempotency-Key": "k" * 300},
        },
    ),
    Endpoint("GET", "/loops/{id}/events", {}, {"headers": {"Last-Event-ID": "abc"}}),
    Endpoint("GET", "/loops/{id}/messages", {}, {"params": {"limit": "0", "after": "turn_x"}}),
    Endpoint(
        "POST",
        "/loops/{id}/choices/choice_x",
        {"json": {"allow": True}},
        {"json": {"allow": "yes", "source": 5}},
    ),
    Endpoint("POST", "/loops/{id}/interrupt", {}, {"json": [1, 2]}),
]


@pytest.mark.parametrize("endpoint", LOOP_ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
async def test_owner_and_existence_come_first(
    server: Server, world: World, endpoint: Endpoint
) -> None:
    mine = endpoint.path.format(id=world.loop)
    for kwargs in (endpoint.good, endpoint.bad):
        r = await world.bob.request(endpoint.method, mine, timeout=TIMEOUT, **kwargs)
        assert_error(r, 403, "not_loop_owner")
        r = await world.anon.request(endpoint.method, mine, timeout=TIMEOUT, **kwargs)
        assert_error(r, 401, "missing_credentials")
        for unknown in (UNKNOWN_LOOP, UNKNOWN_LOOP.removeprefix("loop_"), "%00", "x" * 5000):
            path = endpoint.path.format(id=unknown)
            r = await server.http.request(endpoint.method, path, timeout=TIMEOUT, **kwargs)
            assert_error(r, 404, "loop_not_found")
    loop = (await server.http.get(f"/loops/{world.loop}")).json()
    assert loop["archived"] is False and loop["turn_count"] == 0  # bob changed nothing


async def test_loop_ids_with_and_without_prefix(server: Server, world: World) -> None:
    bare = world.loop.removeprefix("loop_")
    assert (await server.http.get(f"/loops/{bare}")).json()["id"] == world.loop
    for method, path, status in [
        ("GET", f"/loops/{bare}/messages", 200),
        ("POST", f"/loops/{bare}/interrupt", 202),  # also when nothing runs
        ("POST", f"/loops/{world.loop}/interrupt", 202),
        ("GET", f"/loops?after={bare}", 200),
        ("GET", f"/loops?before={bare}", 200),
    ]:
        r = await server.http.request(method, path)
        assert r.status_code == status, _describe(r)
    listed = (await server.http.get("/loops", params={"archived": "true"})).json()["data"]
    assert world.archived in [loop["id"] for loop in listed]  # archived by its bare id


# ---- 429 -----------------------------------------------------------------------------------


async def test_rate_limit(server: Server, tmp_path: Any) -> None:
    limited = await start_server(tmp_path, rate_limit_per_minute=5)
    try:
        for _ in range(5):
            r = await limited.http.get("/loops")
            assert r.status_code == 200, _describe(r)
        r = await limited.http.get("/loops")
        assert_error(r, 429, "too_many_requests")
        assert 1 <= int(r.headers["Retry-After"]) <= 12  # one request every 12 s
        async with limited.client(await limited.token_for("bob")) as bob:
            assert (await bob.get("/loops")).status_code == 200  # a budget per user
    finally:
        await stop_server(limited)


# ---- bad input on every endpoint: the contract's JSON error, never a 5xx ----------------------


JSON = "application/json"
STATUS_OF = {
    "not_found": 404,
    "loop_not_found": 404,
    "choice_not_found": 404,
    "method_not_allowed": 405,
}
LOOPS = f"{API}/loops"
MESSAGES = f"{API}/loops/{{loop}}/messages"
CHOICE = f"{API}/loops/{{loop}}/choices/choice_nope"
EVENTS = f"{API}/loops/{{loop}}/events"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str  # under the server root; {loop} is alice's idle loop
    status: int
    code: str | None  # None: a success
    body: bytes | None
    headers: dict[str, str | bytes]


def case(
    name: str,
    method: str,
    path: str,
    expect: str | int,
    body: Any = None,
    content_type: str | None = JSON,
    headers: dict[str, str | bytes] | None = None,
) -> Case:
    """`expect` is the error code, or the status of a success; a body not in bytes is JSON."""
    raw = body if body is None or isinstance(body, bytes) else as_json(body)
    headers = dict(headers or {})
    if raw is not None and content_type is not None:
        headers["Content-Type"] = content_type
    if isinstance(expect, int):
        return Case(name, method, path, expect, None, raw, headers)
    return Case(name, method, path, STATUS_OF.get(expect, 400), expect, raw, headers)


def post(name: str, path: str, expect: str | int, body: Any, **kwargs: Any) -> Case:
    return case(name, "POST", path, expect, body, **kwargs)


def get(name: str, path: str, expect: str | int, **kwargs: Any) -> Case:
    return case(name, "GET", path, expect, **kwargs)


def bad_bodies(prefix: str, path: str, not_json: str, not_object: str) -> list[Case]:
    """The same malformed bodies, for each endpoint that takes one."""
    return [
        post(f"{prefix}-malformed", path, not_json, b'{"a": '),
        post(f"{prefix}-array", path, not_object, b"[]"),
        post(f"{prefix}-string", path, not_object, b'"x"'),
        post(f"{prefix}-number", path, not_object, b"42"),
        post(f"{prefix}-null", path, not_object, b"null"),
        post(f"{prefix}-not-utf8", path, not_json, b'{"a": "\xff"}'),
        post(f"{prefix}-utf16", path, not_json, '{"a": "b"}'.encode("utf-16")),
        post(f"{prefix}-nan", path, not_json, b'{"a": NaN}'),
        post(f"{prefix}-infinity", path, not_json, b'{"a": -Infinity}'),
        post(f"{prefix}-lone-surrogate", path, not_json, b'{"a": "\\ud800"}'),
        post(f"{prefix}-huge-integer", path, not_json, b'{"a": ' + b"9" * 5000 + b"}"),
        post(f"{prefix}-deep", path, not_json, nested(500)),
        post(f"{prefix}-very-deep", path, not_json, b"[" * 100_000 + b"]" * 100_000),
        post(f"{prefix}-over-the-body-cap", path, "content_too_large", b"x" * (2 * MB + 1)),
    ]


LAST_EVENT_IDS: list[tuple[str, str | bytes]] = [
    ("word", "abc"),
    ("negative", "-1"),
    ("fraction", "1.5"),
    ("empty", ""),
    ("digits-5000", "9" * 5000),
    ("over-int64", "9" * 20),
    ("superscript", b"\xb2"),
    ("arabic-digit", "٣".encode()),
    ("hex", "0x10"),
]
ODD_METADATA_KEYS = (
    "metadata.$=1&metadata.a[0]=1&metadata.%5C=1&metadata.'=%00&metadata.%E2%98%83=1"
)
WRONG_METHODS = [
    ("PUT", LOOPS),
    ("PATCH", f"{LOOPS}/{{loop}}"),
    ("PUT", MESSAGES),
    ("GET", f"{LOOPS}/{{loop}}/interrupt"),
    ("GET", CHOICE),
    ("DELETE", EVENTS),
    ("GET", f"{API}/login"),
    ("DELETE", f"{API}/me/tokens"),
    ("POST", "/healthz"),
    ("OPTIONS", LOOPS),
]
# "/" is the pages' root now (it redirects to /loops): no longer an unknown route.
UNKNOWN_ROUTES = ["/nope", API, f"{API}/nope", "/api/v2/loops", f"{MESSAGES}/x", f"{API}/me"]

CASES: list[Case] = [
    # POST /loops
    *bad_bodies("create", LOOPS, "invalid_json", "invalid_request"),
    post("create-title-number", LOOPS, "invalid_request", {"title": 5}),
    post("create-title-null", LOOPS, "invalid_request", {"title": None}),
    post("create-metadata-list", LOOPS, "invalid_request", {"metadata": [1]}),
    post("create-metadata-string", LOOPS, "invalid_request", {"metadata": "x"}),
    post("create-profiles-string", LOOPS, "invalid_request", {"profiles": "a"}),
    post("create-profiles-numbers", LOOPS, "invalid_request", {"profiles": [1]}),
    post("create-vault-number", LOOPS, "invalid_request", {"vault": 1}),
    post("create-repo-list", LOOPS, "invalid_request", {"repo": []}),
    post("create-unknown-field", LOOPS, "invalid_request", {"colour": "red"}),
    post("create-unknown-profile", LOOPS, "unknown_profile", {"profiles": ["nope"]}),
    post("create-unknown-vault", LOOPS, "unknown_vault", {"vault": "nope"}),
    post("create-unknown-repo", LOOPS, "unknown_repo", {"repo": "nope"}),
    post("create-huge-title", LOOPS, "title_too_long", {"title": "t" * MB}),
    post("create-huge-metadata", LOOPS, "metadata_too_large", {"metadata": {"k": "v" * MB}}),
    post("create-deep-metadata", LOOPS, "invalid_json", nested(900)),
    post("create-text-plain", LOOPS, "invalid_request", {"title": "t"}, content_type="text/plain"),
    post("create-no-content-type", LOOPS, "invalid_request", {"title": "t"}, content_type=None),
    post("create-form", LOOPS, "invalid_request", b"title=t", content_type="multipart/form-data"),
    post("create-nul-in-title", LOOPS, 201, {"title": "a\x00b"}),
    # POST /loops/{id}/messages
    *bad_bodies("send", MESSAGES, "invalid_json", "invalid_request"),
    post("send-content-number", MESSAGES, "invalid_request", {"content": 5}),
    post("send-content-null", MESSAGES, "invalid_request", {"content": None}),
    post("send-content-list", MESSAGES, "invalid_request", {"content": ["hi"]}),
    post("send-content-object", MESSAGES, "invalid_request", {"content": {"text": "hi"}}),
    post("send-unknown-field", MESSAGES, "invalid_request", {"content": "hi", "images": "x"}),
    post("send-content-surrogate", MESSAGES, "invalid_json", b'{"content": "hi \\udfff"}'),
    post(
        "send-text-plain", MESSAGES, "invalid_request", {"content": "hi"}, content_type="text/plain"
    ),
    post("send-no-content-type", MESSAGES, "invalid_request", {"content": "hi"}, content_type=None),
    post(
        "send-huge-key",
        MESSAGES,
        "idempotency_key_too_long",
        {"content": "hi"},
        headers={"Idempotency-Key": "k" * 8000},
    ),
    # POST /loops/{id}/choices/{choice_id}: not a JSON object is a bad payload; else not pending
    *bad_bodies("choice", CHOICE, "invalid_choice_payload", "invalid_choice_payload"),
    post("choice-allow-string", CHOICE, "choice_not_found", {"allow": "yes"}),
    post("choice-long-id", CHOICE.replace("nope", "c" * 5000), "choice_not_found", {"allow": True}),
    post(
        "choice-text-plain", CHOICE, "choice_not_found", {"allow": True}, content_type="text/plain"
    ),
    # GET /loops
    *(
        get(f"list-{query}", f"{LOOPS}?{query}", "invalid_request")
        for query in [
            "limit=abc",
            "limit=0",
            "limit=101",
            "limit=1.5",
            "limit=-1",
            "limit=",
            "limit=99999999999999999999999",
            "archived=maybe",
            "archived=",
        ]
    ),
    get("list-limit-100", f"{LOOPS}?limit=100&archived=true", 200),
    get("list-unknown-param", f"{LOOPS}?colour=red", 200),
    get("list-after-unknown", f"{LOOPS}?after={UNKNOWN_LOOP}", "invalid_cursor"),
    get("list-before-unknown", f"{LOOPS}?before=%00", "invalid_cursor"),
    get("list-metadata-filter", f"{LOOPS}?metadata.k=v&metadata.x.y=%FF", 200),
    get("list-metadata-quote", f'{LOOPS}?metadata.a"b=1', "invalid_request"),
    get("list-metadata-nul", f"{LOOPS}?metadata.a%00=1", "invalid_request"),
    get("list-metadata-odd-keys", f"{LOOPS}?{ODD_METADATA_KEYS}", 200),
    # GET /loops/{id}/messages
    *(
        get(f"history-{query}", f"{MESSAGES}?{query}", "invalid_request")
        for query in ["limit=abc", "limit=0", "limit=101"]
    ),
    get("history-after-unknown", f"{MESSAGES}?after=turn_nope", "invalid_cursor"),
    get("history-limit-100", f"{MESSAGES}?limit=100", 200),
    # GET /loops/{id}/events: a Last-Event-ID that is not an event id
    *(
        get(f"events-last-id-{name}", EVENTS, "invalid_last_event_id", headers={"Last-Event-ID": v})
        for name, v in LAST_EVENT_IDS
    ),
    # headers
    get("huge-header", LOOPS, 200, headers={"X-Filler": "f" * 8000}),
    get("many-headers", LOOPS, 200, headers={f"X-H{i}": "v" for i in range(100)}),
    get("binary-header", LOOPS, 200, headers={"X-Odd": bytes(range(128, 256))}),
    # paths
    get("path-nul", f"{LOOPS}/%00", "loop_not_found"),
    get("path-long", f"{LOOPS}/{'x' * 5000}", "loop_not_found"),
    get("path-not-utf8", f"{LOOPS}/%FF%FE", "loop_not_found"),
    get("path-prefix-only", f"{LOOPS}/loop_", "loop_not_found"),
    get("path-encoded-slash", f"{LOOPS}/a%2Fb", "not_found"),  # routed on the decoded path
    case("path-nul-delete", "DELETE", f"{LOOPS}/%00", "loop_not_found"),
    post("path-nul-send", f"{LOOPS}/%00/messages", "loop_not_found", {"content": "hi"}),
    # unknown routes and wrong methods
    *(get(f"route-{path}", path, "not_found") for path in UNKNOWN_ROUTES),
    *(case(f"method-{m}-{path}", m, path, "method_not_allowed") for m, path in WRONG_METHODS),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_bad_input_gets_a_json_error(world: World, case: Case) -> None:
    path = case.path.format(loop=world.loop)
    r = await world.root.request(case.method, path, content=case.body, headers=case.headers)
    assert_clean(r)
    if case.code is None:
        assert r.status_code == case.status, _describe(r)
    else:
        assert_error(r, case.status, case.code)


async def test_body_cap_holds_without_content_length(world: World) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * MB

    for path in (LOOPS, MESSAGES.format(loop=world.loop), CHOICE.format(loop=world.loop)):
        r = await world.root.post(
            path, content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert_error(r, 400, "content_too_large")


# ---- a fuzz of the OpenAPI document ----------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    params: tuple[tuple[str, str], ...]  # (in, name)
    fields: tuple[str, ...]  # of the JSON body, if any
    has_body: bool


def operations(doc: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            params = tuple((p["in"], p["name"]) for p in operation.get("parameters", []))
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            fields = tuple(_resolve(doc, body["schema"]).get("properties", {})) if body else ()
            found.append(Operation(method.upper(), path, params, fields, body is not None))
    return found


# Values that have broken servers like this one, mixed in with random ones.
NASTY = [
    "",
    " ",
    "0",
    "-1",
    "1.5",
    "1e3",
    "0x10",
    "9" * 25,
    "²",
    "٣",
    "NaN",
    "null",
    "true",
    "[]",
    "{}",
    '"',
    "'",
    "\\",
    "\x00",
    'a"b',
    "%",
    "%00",
    "../..",
    "loop_",
    "$.a",
    "é",
    "☃",
    "x" * 5000,
]
TEXT = st.text(max_size=30) | st.sampled_from(NASTY)
# What a client can put in a header value: Latin-1, no controls, no outer blanks.
HEADER_TEXT = (
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=300,
    )
    | st.sampled_from([v for v in NASTY if all(0x20 <= ord(c) <= 0xFF for c in v)])
).map(lambda value: value.strip(" "))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.just("\ud800"),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
RAW_BODIES = st.binary(max_size=64) | st.sampled_from(
    [nested(900), b"[" * 100_000, b'{"a": NaN}', b'{"a": ' + b"1" * 5000 + b"}", b'"\xff"']
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        None,
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ]
)


@st.composite
def requests(draw: st.DrawFn, ops: list[Operation], loops: list[str]) -> dict[str, Any]:
    """One request to a documented operation, with odd values in every part of it."""
    op = draw(st.sampled_from(ops))
    path = op.path
    for place, name in op.params:
        if place != "path":
            continue
        # Real ids only where a valid request cannot open an endless stream or run the agent.
        real = name == "loop_id" and not path.endswith("/events")
        some_id = TEXT.filter(bool)
        value = draw(st.sampled_from(loops) | some_id if real else some_id)
        path = path.replace(f"{{{name}}}", quote(value, safe=""))
    params = {
        name: draw(TEXT) for place, name in op.params if place == "query" and draw(st.booleans())
    }
    if op.path.endswith("/loops") and op.method == "GET" and draw(st.booleans()):
        params[f"metadata.{draw(TEXT)}"] = draw(TEXT)
    headers: dict[str, bytes] = {
        name: draw(HEADER_TEXT).encode("latin-1")
        for place, name in op.params
        if place == "header" and draw(st.booleans())
    }
    content = None
    if op.has_body or draw(st.booleans()):
        shaped = st.fixed_dictionaries({}, optional=dict.fromkeys(op.fields, JSON_VALUES))
        value = draw(shaped | JSON_VALUES)
        content = draw(st.just(json.dumps(value).encode()) | RAW_BODIES)
        content_type = draw(CONTENT_TYPES)
        if content_type is not None:
            headers["Content-Type"] = content_type.encode()
    return {
        "method": op.method,
        "url": path,
        "params": params,
        "headers": headers,
        "content": content,
    }


async def test_openapi_fuzz(server: Server) -> None:
    """Requests drawn from the OpenAPI document, with odd values: never a 5xx, always JSON."""
    doc = (await server.http.get("/openapi.json")).json()
    ops = operations(doc)
    assert len(ops) >= len(CONTRACT_ENDPOINTS)
    token = await server.token_for("fuzz")
    async with server.client(token) as fuzz:
        archived = await new_loop(fuzz)
        assert (await fuzz.delete(f"/loops/{archived}")).status_code == 204
    loops = [archived, archived.removeprefix("loop_")]

    @settings(
        max_examples=1000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests(ops, loops))
    def fuzz_one(request: dict[str, Any]) -> None:
        assert_clean(http.request(**request))

    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT
    ) as http:
        # In a thread: the server answers on this event loop.
        await asyncio.to_thread(fuzz_one)
    # Nothing the fuzz stored breaks a later read.
    async with server.client(token) as fuzz:
        for archived_too in ("false", "true"):
            r = await fuzz.get("/loops", params={"limit": 100, "archived": archived_too})
            assert r.status_code == 200, _describe(r)
