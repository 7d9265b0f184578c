"""What the loop page reads through the API, view links, and how the pages are served."""

from __future__ import annotations

import asyncio
import re
import stat

import httpx
import pytest

from bridge.cli import main as cli
from tests.sse import events, text_of, turn

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def new_loop(http: httpx.AsyncClient, title: str = "web") -> str:
    response = await http.post("/loops", json={"title": title})
    assert response.status_code == 201
    return response.json()["id"]


async def history(http: httpx.AsyncClient, loop: str, **params: str) -> dict:
    response = await http.get(f"/loops/{loop}/messages", params={"limit": "100", **params})
    assert response.status_code == 200, response.text
    return response.json()


# ---- tool calls: input, output, diff -------------------------------------------------------


async def test_history_keeps_tool_input_output_and_an_edit_diff(server) -> None:
    loop = await new_loop(server.http)
    wrote = await turn(
        server.http, loop, "[[write: notes.txt :: one\ntwo\nthree]]", permission_mode="acceptEdits"
    )
    assert wrote[-1].name == "done"
    result = next(e for e in wrote if e.name == "tool_result")
    assert "+one" in result.data["diff"] and "+three" in result.data["diff"]
    call = next(e for e in wrote if e.name == "tool_call")
    assert call.data["input"] == {"file_path": "notes.txt", "content": "one\ntwo\nthree"}

    edited = await turn(
        server.http, loop, "[[edit: notes.txt :: two :: TWO]]", permission_mode="acceptEdits"
    )
    assert edited[-1].name == "done", edited
    # A new loop: a warm agent cannot switch to bypassPermissions.
    shell = await new_loop(server.http)
    ran = await turn(
        server.http, shell, "[[bash: echo web-output]]", permission_mode="bypassPermissions"
    )
    assert ran[-1].name == "done", ran

    items = (await history(server.http, loop))["data"]
    write_call = items[0]["tool_calls"][0]
    assert write_call["tool"] == "Write" and write_call["ok"] is True
    assert write_call["input"]["content"] == "one\ntwo\nthree"
    assert write_call["diff"].startswith("--- /dev/null\n+++ b/notes.txt")
    read_call, edit_call = items[1]["tool_calls"]
    assert read_call["tool"] == "Read" and "two" in read_call["output"]
    assert read_call["diff"] is None
    assert edit_call["tool"] == "Edit"
    assert "\n-two\n+TWO\n" in edit_call["diff"]
    bash_call = (await history(server.http, shell))["data"][0]["tool_calls"][0]
    assert bash_call["output"] == "web-output"
    assert bash_call["event_id"] > 0 and bash_call["text_offset"] == 0


async def test_a_huge_tool_output_is_cut(server) -> None:
    loop = await new_loop(server.http)
    command = "python3 -c \"print('x' * 25000)\""
    await turn(server.http, loop, f"[[bash: {command}]]", permission_mode="bypassPermissions")
    call = (await history(server.http, loop))["data"][0]["tool_calls"][0]
    assert call["ok"] is True
    assert len(call["output"]) < 20_000 and "more characters]" in call["output"]


# ---- choices -------------------------------------------------------------------------------


async def test_a_pending_choice_is_in_history_and_the_answer_says_who(server) -> None:
    loop = await new_loop(server.http)

    async def run() -> list:
        return await turn(server.http, loop, "[[bash: echo asked > asked.txt]]")

    task = asyncio.create_task(run())

    async def pending() -> dict | None:
        items = (await history(server.http, loop))["data"]
        return items[0]["pending_choice"] if items else None

    choice = None
    for _ in range(200):
        choice = await pending()
        if choice:
            break
        await asyncio.sleep(0.05)
    assert choice and choice["kind"] == "permission"
    assert choice["payload"]["tool"] == "Bash"
    assert choice["payload"]["input_summary"] == "echo asked > asked.txt"
    response = await server.http.post(
        f"/loops/{loop}/choices/{choice['choice_id']}", json={"allow": True, "source": "web:alice"}
    )
    assert response.status_code == 202
    assert (await task)[-1].name == "done"
    item = (await history(server.http, loop))["data"][0]
    assert item["pending_choice"] is None
    record = item["choices"][0]
    assert record["source"] == "web:alice" and record["answer"] == {"allow": True}
    assert record["payload"]["tool"] == "Bash" and record["event_id"] > 0


# ---- history, then events, with nothing missed or repeated ----------------------------------


async def test_events_after_the_history_continue_it_exactly(server) -> None:
    loop = await new_loop(server.http)
    sending = asyncio.create_task(turn(server.http, loop, "[[slow: 2]]"))
    page: dict = {}

    async def partway() -> bool:
        nonlocal page
        page = await history(server.http, loop)
        text = page["data"][0]["assistant_text"] if page["data"] else ""
        return "slow 2/10" in text and page["data"][0]["ended"] == "running"

    for _ in range(200):
        if await partway():
            break
        await asyncio.sleep(0.05)
    so_far = page["data"][0]["assistant_text"]
    seen = []
    async for ev in events(
        server.http,
        "GET",
        f"/loops/{loop}/events",
        params={"last_event_id": str(page["last_event_id"])},
    ):
        seen.append(ev)
        if ev.name in ("done", "error", "interrupted"):
            break
    await sending
    assert "snapshot" not in [e.name for e in seen]
    expected = "".join(f"slow {n}/10. " for n in range(1, 11))
    assert so_far + text_of(seen) == expected
    # The header wins over the query, as after an EventSource's own reconnect.
    first = seen[0].id
    async for ev in events(
        server.http,
        "GET",
        f"/loops/{loop}/events",
        params={"last_event_id": "0"},
        headers={"Last-Event-ID": str(first)},
    ):
        assert ev.id == first + 1
        break
    bad = await server.http.get(f"/loops/{loop}/events", params={"last_event_id": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"


# ---- view links ------------------------------------------------------------------------------


async def test_a_view_link_reads_one_loop_and_nothing_else(server) -> None:
    loop = await new_loop(server.http, "shared")
    other = await new_loop(server.http, "not shared")
    await turn(server.http, loop, "hello viewers")
    server.engine.settings.public_url = "https://loops.example.com/"
    try:
        response = await server.http.post(f"/loops/{loop}/view-links")
    finally:
        server.engine.settings.public_url = None
    assert response.status_code == 201, response.text
    link = response.json()
    assert link["url"].startswith(f"https://loops.example.com/loops/{loop}?grant=v1.")
    assert link["expires_at"].endswith("Z")
    grant = httpx.URL(link["url"]).params["grant"]
    anonymous = httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=30)
    async with anonymous:
        page = await anonymous.get(f"/loops/{loop}/messages", params={"grant": grant})
        assert page.status_code == 200
        assert page.json()["data"][0]["assistant_text"] == "Echo #1: hello viewers"
        async with anonymous.stream(
            "GET", f"/loops/{loop}/events", params={"grant": grant, "last_event_id": "0"}
        ) as stream:
            assert stream.status_code == 200
        # Only history and events: nothing that changes the loop, nothing of another loop.
        for method, path in [
            ("GET", f"/loops/{loop}"),
            ("POST", f"/loops/{loop}/interrupt"),
            ("POST", f"/loops/{loop}/view-links"),
            ("GET", "/loops"),
        ]:
            refused = await anonymous.request(method, path, params={"grant": grant}, json={})
            assert refused.status_code == 401, (method, path)
        sent = await anonymous.post(
            f"/loops/{loop}/messages", params={"grant": grant}, json={"content": "hi"}
        )
        assert sent.status_code == 401
        wrong = await anonymous.get(f"/loops/{other}/messages", params={"grant": grant})
        assert wrong.status_code == 403
        assert wrong.json()["error"]["code"] == "invalid_view_link"
        tampered = grant[:-2] + ("AA" if not grant.endswith("AA") else "BB")
        bad = await anonymous.get(f"/loops/{loop}/messages", params={"grant": tampered})
        assert bad.status_code == 403 and "not valid" in bad.json()["error"]["message"]
        # Another user cannot mint a link to alice's loop.
        bob = server.client(await server.token_for("bob"))
        async with bob:
            assert (await bob.post(f"/loops/{loop}/view-links")).status_code == 403


async def test_an_expired_link_is_refused(server) -> None:
    loop = await new_loop(server.http)
    response = await server.http.post(f"/loops/{loop}/view-links", json={"days": 0.00002})
    assert response.status_code == 201
    grant = httpx.URL(response.json()["url"]).params["grant"]
    anonymous = httpx.AsyncClient(base_url=server.url, timeout=30)
    async with anonymous:

        async def status() -> int:
            return (
                await anonymous.get(f"/api/v1/loops/{loop}/messages", params={"grant": grant})
            ).status_code

        assert await status() == 200
        await asyncio.sleep(2.0)  # the grant's own clock: 0.00002 days is 1.7 s
        assert await status() == 403
        page = await anonymous.get(f"/loops/{loop}", params={"grant": grant})
        assert page.status_code == 403 and "expired" in page.text
        assert "<form" not in page.text
    for bad_days in (0, -1, 400, "x"):
        refused = await server.http.post(f"/loops/{loop}/view-links", json={"days": bad_days})
        assert refused.status_code == 400


async def test_keys_rotate_ends_every_link(server, monkeypatch, capsys) -> None:
    loop = await new_loop(server.http)
    url = (await server.http.post(f"/loops/{loop}/view-links")).json()["url"]
    key = server.home / "view-links.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    anonymous = httpx.AsyncClient(timeout=30)
    async with anonymous:
        assert (await anonymous.get(url)).status_code == 200
        monkeypatch.setenv("LOOPBRIDGE_HOME", str(server.home))
        await asyncio.to_thread(cli, ["keys", "rotate"])
        assert "every view link made before has ended" in capsys.readouterr().out
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

        async def refused() -> bool:
            return (await anonymous.get(url)).status_code == 403

        for _ in range(60):  # a server looks at the key file again within a second
            if await refused():
                break
            await asyncio.sleep(0.1)
        assert await refused()
        fresh = (await server.http.post(f"/loops/{loop}/view-links")).json()["url"]
        assert (await anonymous.get(fresh)).status_code == 200


# ---- the pages themselves ----------------------------------------------------------------------


async def test_pages_redirect_to_login_and_carry_a_strict_policy(server) -> None:
    anonymous = httpx.AsyncClient(base_url=server.url, timeout=30)
    async with anonymous:
        root = await anonymous.get("/")
        assert root.status_code == 303 and root.headers["location"] == "/loops"
        loops = await anonymous.get("/loops")
        assert loops.status_code == 303 and loops.headers["location"] == "/login?next=/loops"
        login = await anonymous.get("/login", params={"next": "//evil.example.com/"})
        assert login.status_code == 200
        assert 'data-next="/loops"' in login.text
        policy = login.headers["content-security-policy"]
        for directive in (
            "default-src 'self'",
            "script-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ):
            assert directive in policy
        assert "unsafe-inline" not in policy
        assert login.headers["x-content-type-options"] == "nosniff"
        # No inline script or style anywhere: every script names its file.
        scripts = re.findall(r"<script([^>]*)>", login.text)
        assert scripts and all('src="/static/' in attrs for attrs in scripts)
        assert "style=" not in login.text and "<style" not in login.text
        asset = await anonymous.get("/static/js/loop.js")
        assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
        assert asset.headers["x-content-type-options"] == "nosniff"
        missing = await anonymous.get("/static/nothing.js")
        assert missing.status_code == 404
        nojs = await anonymous.post("/login", data={"username": "a", "password": "b"})
        assert nojs.status_code == 303 and nojs.headers["location"] == "/login?nojs=1"


async def test_a_session_sees_its_own_loops_only(server) -> None:
    await server.engine.accounts.set_password("alice", "alice-password")
    mine = await new_loop(server.http, "alice's <b>loop</b>")
    bob = server.client(await server.token_for("bob"))
    async with bob:
        theirs = (await bob.post("/loops", json={"title": "bob's"})).json()["id"]
    browser = httpx.AsyncClient(base_url=server.url, timeout=30)
    async with browser:
        login = await browser.post(
            "/api/v1/login", json={"username": "alice", "password": "alice-password"}
        )
        assert login.status_code == 204
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
        listing = await browser.get("/loops")
        assert listing.status_code == 200
        assert "alice&#39;s &lt;b&gt;loop&lt;/b&gt;" in listing.text  # escaped, never markup
        assert "bob&#39;s" not in listing.text
        page = await browser.get(f"/loops/{mine}")
        assert page.status_code == 200 and 'id="composer"' in page.text
        assert f'data-loop-id="{mine}"' in page.text
        other = await browser.get(f"/loops/{theirs}")
        assert other.status_code == 403 and "another user" in other.text
        unknown = await browser.get("/loops/loop_000000000000000000000000")
        assert unknown.status_code == 404


async def test_the_cookie_is_secure_behind_https(server) -> None:
    await server.engine.accounts.set_password("alice", "alice-password")
    browser = httpx.AsyncClient(base_url=server.url, timeout=30)
    async with browser:
        # uvicorn trusts X-Forwarded-Proto from FORWARDED_ALLOW_IPS (127.0.0.1 by default).
        login = await browser.post(
            "/api/v1/login",
            json={"username": "alice", "password": "alice-password"},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert login.status_code == 204
        assert "secure" in login.headers["set-cookie"].lower()


async def test_the_key_file_is_made_private(tmp_path) -> None:
    from bridge.server.web.grants import Keyring

    ring = Keyring(tmp_path / "home")
    assert len(ring.key()) == 32
    assert stat.S_IMODE((tmp_path / "home" / "view-links.key").stat().st_mode) == 0o600
    assert len((tmp_path / "home" / "view-links.key").read_text().strip()) == 64


async def test_diffs_and_cuts_without_the_cli_patch() -> None:
    from core.tool_record import clipped_input, edit_diff, output_text

    change = {"file_path": "a.py", "old_string": "x = 1", "new_string": "x = 2"}
    edit = edit_diff("Edit", change, None)
    assert edit is not None and "-x = 1\n+x = 2" in edit
    assert edit_diff("Bash", {"command": "ls"}, {"stdout": ""}) is None
    assert edit_diff("Edit", {"file_path": "a.py"}, None) is None
    assert clipped_input({"content": "y" * 5000, "n": 3})["content"].endswith(
        "… [1000 more characters]"
    )
    assert output_text([{"type": "text", "text": "hi"}, {"type": "image"}]) == "hi\n[image]"
