"""The OpenAPI document is the contract: what it says is what the server does.

Error codes per operation, security schemes, the real status codes and bodies, typed stream
events, the offline docs page; and schemathesis, every check and phase, over a live server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError

from bridge.contract.events import EVENT_DATA, parse_event
from bridge.contract.models import CHOICE_ANSWER
from bridge.server.sse import PING
from tests.conftest import Server, start_server, stop_server
from tests.polling import until
from tests.sse import TERMINAL, Ev, events

API = "/api/v1"
ROOT = Path(__file__).resolve().parent.parent
METHODS = {"get", "post", "put", "patch", "delete"}
CONTRACT_CODES = {
    400: {
        "missing_content", "content_too_large", "loop_archived", "title_too_long",
        "metadata_too_large", "idempotency_key_too_long", "invalid_choice_payload",
        "invalid_permission_mode",
    },
    401: {"missing_credentials", "invalid_token"},
    403: {"not_loop_owner"},
    404: {"loop_not_found", "choice_not_found", "token_not_found"},
    409: {"idempotency_key_reused"},
    429: {"too_many_requests"},
    431: {"headers_too_large"},
}  # fmt: skip
# Failures of a turn, which arrive as `error` events once its stream is open.
STREAM_CODES = {"sandbox_spawn_failed", "sandbox_evicted", "agent_failed"}
SESSION_ONLY = {("post", "/me/tokens"), ("get", "/me/tokens"), ("delete", "/me/tokens/{token_id}")}
PUBLIC = {("post", "/login"), ("post", "/logout"), ("get", "/healthz")}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def api(standin: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """A server for a fuzzer: no rate limit in its way, idle agents stopped soon."""
    running = await start_server(
        tmp_path_factory.mktemp("home"), rate_limit_per_minute=1_000_000, agent_idle_seconds=2
    )
    running.standin = standin
    yield running
    await stop_server(running)


async def _doc(api: Server) -> dict[str, Any]:
    r = await api.http.get("/openapi.json", headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    return r.json()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path.removeprefix(API), op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


async def _new_loop(http: httpx.AsyncClient) -> str:
    r = await http.post("/loops", json={"title": "openapi"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


# ---- the document ------------------------------------------------------------------------


async def test_every_error_response_lists_its_codes_and_none_is_422(api: Server) -> None:
    doc = await _doc(api)
    seen: dict[int, set[str]] = {}
    for method, path, op in _operations(doc):
        assert "422" not in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            schema = response["content"]["application/json"]["schema"]
            error = schema["properties"]["error"]
            assert schema["required"] == ["error"]
            assert set(error["required"]) == {"type", "code", "message"}
            codes = error["properties"]["code"]["enum"]
            assert codes and all(f"`{code}`" in response["description"] for code in codes)
            seen.setdefault(int(status), set()).update(codes)
        if path.startswith("/loops/"):
            assert {"not_loop_owner"} <= set(_codes(op, 403)), (method, path)
            assert {"loop_not_found"} <= set(_codes(op, 404)), (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for status, codes in CONTRACT_CODES.items():
        assert codes <= seen.get(status, set()), (status, codes - seen.get(status, set()))
    error_event = doc["components"]["schemas"]["ErrorEvent"]["description"]
    assert all(f"`{code}`" in error_event for code in STREAM_CODES), error_event


def _codes(op: dict[str, Any], status: int) -> list[str]:
    response = op["responses"].get(str(status))
    if response is None:
        return []
    return response["content"]["application/json"]["schema"]["properties"]["error"]["properties"][
        "code"
    ]["enum"]


async def test_security_schemes_per_operation(api: Server) -> None:
    doc = await _doc(api)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["session"]["in"] == "cookie" and schemes["session"]["name"]
    assert doc["security"] == [{"bearer": []}, {"session": []}]
    for method, path, op in _operations(doc):
        security = op.get("security", doc["security"])
        if (method, path) in SESSION_ONLY:
            assert security == [{"session": []}], (method, path)
        elif (method, path) in PUBLIC:
            assert security == [], (method, path)
        else:
            assert security == doc["security"], (method, path)
            assert {"missing_credentials", "invalid_token"} <= set(_codes(op, 401))


async def test_documented_parameters_and_bodies(api: Server) -> None:
    doc = await _doc(api)
    paths = doc["paths"]
    schemas = doc["components"]["schemas"]
    send = paths[f"{API}/loops/{{loop_id}}/messages"]["post"]
    headers = {p["name"]: p["schema"] for p in send["parameters"] if p["in"] == "header"}
    assert headers["Idempotency-Key"]["maxLength"] == 256
    content = schemas["SendMessage"]["properties"]["content"]
    assert (content["minLength"], content["maxLength"]) == (1, 1024 * 1024)
    assert schemas["CreateLoop"]["properties"]["title"]["maxLength"] == 200
    watch = paths[f"{API}/loops/{{loop_id}}/events"]["get"]
    assert any(p["name"] == "Last-Event-ID" and p["in"] == "header" for p in watch["parameters"])
    listing = paths[f"{API}/loops"]["get"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 100)
    assert "metadata.KEY" in listing["description"]
    choice = paths[f"{API}/loops/{{loop_id}}/choices/{{choice_id}}"]["post"]
    body = choice["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"allow", "answers", "source", "by"}
    assert body["additionalProperties"] is False
    kinds = body["oneOf"]
    answers = [schemas[k["$ref"].rsplit("/", 1)[-1]] for k in kinds]
    assert [a["required"] for a in answers] == [["allow"], ["answers"]]
    assert all(a["additionalProperties"] is False for a in answers)
    assert all(set(a["properties"]) == {a["required"][0], "source", "by"} for a in answers)
    for path in ("/loops/{loop_id}/interrupt", "/loops/{loop_id}/choices/{choice_id}"):
        accepted = paths[API + path]["post"]["responses"]["202"]["content"]["application/json"]
        assert accepted["schema"] == {"$ref": "#/components/schemas/Accepted"}


async def test_stream_responses_reference_every_typed_event(api: Server) -> None:
    doc = await _doc(api)
    schemas = doc["components"]["schemas"]
    union = schemas["LoopEvent"]
    assert set(union["discriminator"]["mapping"]) == set(EVENT_DATA) and len(EVENT_DATA) == 14
    for name, ref in union["discriminator"]["mapping"].items():
        frame = schemas[ref.rsplit("/", 1)[-1]]
        assert frame["properties"]["event"]["const"] == name
        payload = frame["properties"]["data"]["contentSchema"]["$ref"].rsplit("/", 1)[-1]
        assert payload in schemas
    for path, method in (("/loops/{loop_id}/messages", "post"), ("/loops/{loop_id}/events", "get")):
        stream = doc["paths"][API + path][method]["responses"]["200"]
        assert stream["content"] == {
            "text/event-stream": {"schema": {"$ref": "#/components/schemas/LoopEvent"}}
        }
        assert "event: <name>" in stream["description"]
    send = doc["paths"][f"{API}/loops/{{loop_id}}/messages"]["post"]["responses"]["200"]
    assert send["headers"]["X-Turn-Id"]["required"] is True


# ---- the server does what the document says ------------------------------------------------


async def test_interrupt_and_choices_answer_202_with_their_documented_body(api: Server) -> None:
    loop = await _new_loop(api.http)
    r = await api.http.post(f"/loops/{loop}/interrupt")
    assert (r.status_code, r.json()) == (202, {"status": "accepted"})
    assert r.headers["content-type"] == "application/json"


async def test_a_choice_answer_of_either_shape_reaches_the_choice(api: Server) -> None:
    """The choice is looked up before its answer is (tests/test_errors.py checks the shapes
    against a pending choice), so any object answer to no pending choice is 404."""
    loop = await _new_loop(api.http)
    for body in ({"allow": False}, {"answers": {"q1": ["A", "B"]}, "source": "slack"}, {}):
        r = await api.http.post(f"/loops/{loop}/choices/choice_nothere", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "choice_not_found", r.text
    r = await api.http.post(f"/loops/{loop}/choices/choice_nothere", json=[{"allow": True}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_choice_payload"


def test_the_documented_answer_shapes_are_the_engines() -> None:
    accepted = [{"allow": True}, {"answers": {"q1": "Red"}}, {"answers": {"q1": ["Red", "Blue"]}}]
    refused = [
        {}, {"allow": "yes"}, {"allow": 1}, {"answers": "B"}, {"answers": {}},
        {"answers": {"q1": ""}}, {"answers": {"q1": []}}, {"allow": True, "extra": 1},
        {"allow": True, "answers": {"q1": "A"}}, {"allow": True, "source": ""},
        {"allow": True, "source": "s" * 65},
    ]  # fmt: skip
    for body in accepted:
        CHOICE_ANSWER.validate_python(body)
    for body in refused:
        with pytest.raises(ValidationError):
            CHOICE_ANSWER.validate_python(body)


async def test_values_the_schema_allows_are_accepted(api: Server) -> None:
    loop = await _new_loop(api.http)
    for url in ("/loops?after=", "/loops?before=", f"/loops/{loop}/messages?after="):
        r = await api.http.get(url)
        assert r.status_code == 200, (url, r.text)
    r = await api.http.post("/loops", json={"title": "t" * 200})
    assert r.status_code == 201, r.text


async def test_values_the_schema_refuses_are_refused(api: Server) -> None:
    loop = await _new_loop(api.http)
    r = await api.http.post(f"/loops/{loop}/messages", json={"content": ""})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "missing_content")
    r = await api.http.post("/loops", json={"title": "t" * 201})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "title_too_long")
    r = await api.http.post(
        f"/loops/{loop}/messages", json={"content": "hi"}, headers={"Idempotency-Key": "k" * 257}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "idempotency_key_too_long")
    for limit in (0, 101):
        r = await api.http.get("/loops", params={"limit": limit})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/loops", "GET, HEAD, POST"),
        ("PATCH", "/loops/loop_x", "DELETE, GET, HEAD"),
        ("GET", "/loops/loop_x/interrupt", "POST"),
        ("PUT", "/loops/loop_x/messages", "GET, HEAD, POST"),
    ],
)
async def test_a_wrong_method_answers_405_with_allow(
    api: Server, method: str, path: str, allow: str
) -> None:
    r = await api.http.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    assert r.json()["error"]["code"] == "method_not_allowed"


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


async def test_docs_page_needs_nothing_but_this_server(api: Server) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anon:
        page = await anon.get(f"{API}/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", page.text), "the page names another host"
        assert '"validatorUrl": null' in page.text  # Swagger UI would call its public validator
        parser = _Assets()
        parser.feed(page.text)
        scripts = re.findall(r"url: '([^']+)'", page.text)
        assert scripts == [f"{API}/openapi.json"]
        assert len(parser.urls) >= 3
        for url in [*parser.urls, *scripts]:
            r = await anon.get(url)
            assert r.status_code == 200 and r.content, url
            if url.endswith(".js"):
                assert "SwaggerUIBundle" in r.text


# ---- typed events ------------------------------------------------------------------------------


async def _read(stream: AsyncGenerator[Ev, None], into: list[Ev], last: str) -> None:
    """Collect a stream's events up to one named `last` (all of them for ""), then close it."""
    async with contextlib.aclosing(stream):
        async for ev in stream:
            into.append(ev)
            if ev.name == last:
                return


async def test_every_event_the_engine_sends_fits_its_model(api: Server) -> None:
    http = api.http
    loop = await _new_loop(http)
    watched: list[Ev] = []
    watcher = asyncio.create_task(_read(events(http, "GET", f"/loops/{loop}/events"), watched, ""))
    sent: list[Ev] = []

    async def send(content: str, answer: dict[str, Any] | None = None, **body: Any) -> None:
        stream = events(http, "POST", f"/loops/{loop}/messages", json={"content": content, **body})
        async for ev in stream:
            sent.append(ev)
            if ev.name == "requires_choice" and answer is not None:
                url = f"/loops/{loop}/choices/{ev.data['choice_id']}"
                assert (await http.post(url, json=answer)).status_code == 202
            if ev.name in TERMINAL:
                break
        await stream.aclose()

    await send("[[think]]")
    await send("[[bash: echo hi]]", {"allow": True})
    await send("[[ask]]", {"answers": {"q1": "Red"}})
    await send("[[fail]]")
    # A slow turn: a second message queues, a late watcher gets a snapshot, then interrupt.
    slow = asyncio.create_task(send("[[slow: 20]]"))
    await until(lambda: sent and sent[-1].name == "assistant_delta", what="the slow turn")
    queued = asyncio.create_task(send("hello"))
    late: list[Ev] = []
    snapshot = asyncio.create_task(
        _read(events(http, "GET", f"/loops/{loop}/events"), late, "snapshot")
    )
    await asyncio.wait_for(snapshot, 30)
    assert (await http.post(f"/loops/{loop}/interrupt")).status_code == 202
    await asyncio.wait_for(asyncio.gather(slow, queued), 60)
    watcher.cancel()
    seen = [*sent, *watched, *late]
    for ev in seen:
        frame = parse_event(ev.name, ev.data, ev.id)
        assert frame.event == ev.name and (ev.id is not None or ev.name == "ping")
    ping = dict(line.split(": ", 1) for line in PING.decode().split("\r\n") if line)
    parse_event(ping["event"], ping["data"])
    names = {ev.name for ev in seen} | {"ping"}
    # file_shared needs the agent's share_file tool; its model is checked in the document.
    assert names == set(EVENT_DATA) - {"file_shared"}, set(EVENT_DATA) - names


# ---- schemathesis --------------------------------------------------------------------------

# Bounded: 1 to 2.5 minutes on a two-core machine (fuzzing and stateful run real turns).
MAX_EXAMPLES = 20
SCHEMATHESIS_CONFIG = """\
# The links are the document's own; inferred ones would add DELETE /loops/{id}, after which
# an archived loop stays readable (the contract), which use_after_free reports.
[phases.stateful.inference]
algorithms = []

# A new loop names a vault; only configured names are taken, which no schema can say. Mostly
# offer the one this server has, so that loops get made and the links reach them.
[dictionaries.vaults]
values = ["default"]

[[operations]]
include-operation-id = "create_loop"

[operations.parameters]
"body.vault" = { dictionary = "vaults", probability = 0.9 }

# GET /events never ends on a real loop (and ids from earlier answers reach it): read it for
# a second, then judge the events read so far.
[[operations]]
include-operation-id = "watch_loop"
request-timeout = 1
"""


@pytest.mark.timeout(400)
async def test_schemathesis_finds_nothing(api: Server, tmp_path: Path) -> None:
    """Every check, every phase (examples, coverage, fuzzing, stateful), with real credentials:
    a token, and a session for the operations that take only a session.

    POST /messages runs real turns with the stand-in model (its echo answers at once), so
    its streams end; GET /events never ends on a real loop, so it is read for a second (see
    SCHEMATHESIS_CONFIG). The positive-data check allows 400s whose codes depend on state
    (see schemathesis_hooks).
    """
    # The session is another user's: the fuzzer revokes the tokens it lists, not the bearer's.
    await api.engine.accounts.ensure_user("carol")
    secret = await api.engine.accounts.create_session("carol")
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[auth.openapi.bearer]\nbearer = "{api.token}"\n\n'
        f'[auth.openapi.session]\napi_key = "{secret}"\n\n{SCHEMATHESIS_CONFIG}'
    )
    log = tmp_path / "schemathesis.log"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(config),
        "run", f"{api.url}{API}/openapi.json",
        "--checks", "all",
        "--exclude-checks", "positive_data_acceptance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES),
        "--report", "har", "--report-dir", str(tmp_path),
        "--request-timeout", "60",
        "--workers", "1",
        "--seed", "1",  # reproducible, yet random enough to create loops for the links
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        try:
            await asyncio.wait_for(process.wait(), 330)
        except TimeoutError:
            process.kill()
            await process.wait()
            tail = log.read_text()[-5000:]
            raise AssertionError(f"schemathesis did not finish:\n{tail}") from None
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-20000:]
    links = re.search(r"API Links: +(\d+) covered", text)
    assert links and int(links[1]) > 0, text[-3000:]  # the stateful phase reached real loops
    # The session-only operations were reached with the session, not only refused.
    warned = text.partition("Authentication failed")[2].partition("💡")[0]
    assert "/me/tokens" not in warned, warned
