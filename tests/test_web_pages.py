"""The pages in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A person logs in, sees their loops, watches a turn stream, allows a command,
stops a slow turn, reloads in the middle of one; a view link shows a loop
read-only; a model's markup shows as text. The test run saves a screenshot of
a loop page (to `LOOPBRIDGE_SCREENSHOT` when set, e.g. docs/loop-page.png).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.sse import turn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "alice-web-password"
SLOW_TEXT = "".join(f"slow {n}/10. " for n in range(1, 11))
# Generous: two cores shared with other test runs.
WAIT_MS = 30_000

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed"),
]
expect = playwright_api.expect
expect.set_options(timeout=WAIT_MS)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def browser(server) -> AsyncIterator[object]:
    await server.engine.accounts.set_password("alice", PASSWORD)
    async with playwright_api.async_playwright() as driver:
        chromium = await driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        await chromium.close()


class Watch:
    """A page and what it did that a person would notice: dialogs, script errors."""

    def __init__(self, page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)

    async def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _console(self, message) -> None:
        # A refused request (a wrong password's 401) is logged too: that is no script error.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)


@pytest_asyncio.fixture(loop_scope="session")
async def anonymous(browser) -> AsyncIterator[Watch]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    watch = Watch(await context.new_page())
    yield watch
    await context.close()


@pytest_asyncio.fixture(loop_scope="session")
async def alice(browser, server) -> AsyncIterator[Watch]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    watch = Watch(await context.new_page())
    await log_in(watch.page, server.url)
    yield watch
    await context.close()


async def log_in(page, base: str, password: str = PASSWORD) -> None:
    await page.goto(base + "/loops")
    await expect(page).to_have_url(base + "/login?next=/loops")
    await page.fill("input[name=username]", "alice")
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(base + "/loops")


async def new_loop(server, title: str) -> str:
    response = await server.http.post("/loops", json={"title": title})
    assert response.status_code == 201
    return response.json()["id"]


def last_turn(page):
    return page.locator("article.turn").last


async def send(page, text: str) -> None:
    await page.fill("#composer textarea", text)
    await page.click("#send")


async def open_loop(watch: Watch, server, loop: str) -> None:
    await watch.page.goto(f"{server.url}/loops/{loop}")
    await expect(watch.page.locator("#live")).to_have_text("live")


# ---- logging in and the list -------------------------------------------------------------


async def test_log_in_and_see_the_loops(anonymous: Watch, server) -> None:
    page = anonymous.page
    listed = await new_loop(server, "listed in the browser")
    await page.goto(server.url + "/")
    await expect(page).to_have_url(server.url + "/login?next=/loops")
    await page.fill("input[name=username]", "alice")
    await page.fill("input[name=password]", "not the password")
    await page.click("button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")
    await log_in(page, server.url)
    row = page.locator(f"tr[data-loop-id='{listed}']")
    await expect(row).to_contain_text("listed in the browser")
    await expect(row).to_contain_text("idle")
    await row.locator("a").click()
    await expect(page).to_have_url(f"{server.url}/loops/{listed}")
    await expect(page.locator("h1")).to_have_text("listed in the browser")
    await page.click("#logout")
    await expect(page).to_have_url(server.url + "/login")
    await page.goto(server.url + "/loops")
    await expect(page).to_have_url(server.url + "/login?next=/loops")
    assert anonymous.errors == []


# ---- a live loop ------------------------------------------------------------------------------


async def test_the_text_grows_while_the_turn_streams(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "streaming")
    await open_loop(alice, server, loop)
    await send(page, "[[slow: 4]]")
    answer = last_turn(page).locator(".assistant")
    await expect(answer).to_contain_text("slow 2/10.")
    partway = await answer.inner_text()
    assert "slow 10/10." not in partway
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(answer).to_have_text(SLOW_TEXT.strip())
    await expect(last_turn(page).locator(".user-text")).to_have_text("[[slow: 4]]")
    assert alice.errors == []


async def test_allow_a_command_from_the_page(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "permission")
    await open_loop(alice, server, loop)
    await send(page, "[[bash: echo from-the-page > page.txt]]")
    choice = last_turn(page).locator(".choice")
    await expect(choice).to_contain_text("echo from-the-page > page.txt")
    await expect(last_turn(page).locator(".state")).to_have_text("waiting")
    await choice.locator("button.allow").click()
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(choice.locator(".outcome")).to_have_text("Allowed by web:alice")
    await expect(last_turn(page).locator(".assistant .md").last).to_contain_text("Tool ok:")
    tool = last_turn(page).locator("details.tool")
    await expect(tool.locator(".tool-ok")).to_have_text("✓")
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"][0]
    assert history["choices"][0]["source"] == "web:alice"
    assert alice.errors == []


async def test_answer_a_question_from_the_page(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "question")
    await open_loop(alice, server, loop)
    await send(page, "[[ask]]")
    choice = last_turn(page).locator(".choice")
    await choice.get_by_label("Blue").check()
    await choice.locator("button[type=submit]").click()
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(last_turn(page).locator(".assistant")).to_contain_text('"Which color?"="Blue"')
    await expect(choice.locator(".outcome")).to_contain_text("Which color? → Blue")


async def test_stop_a_slow_turn(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "stop")
    await open_loop(alice, server, loop)
    await send(page, "[[slow: 60]]")
    await expect(last_turn(page).locator(".assistant")).to_contain_text("slow 1/10.")
    await page.click("#stop")
    await expect(last_turn(page).locator(".state")).to_have_text("interrupted")
    await expect(page.locator("#stop")).to_be_hidden()
    assert "slow 10/10" not in await last_turn(page).locator(".assistant").inner_text()


async def test_reload_in_the_middle_of_a_turn_loses_nothing(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "reload")
    # Sent from elsewhere (a script): the page only watches.
    sending = asyncio.create_task(turn(server.http, loop, "[[slow: 6]]"))
    await open_loop(alice, server, loop)
    answer = last_turn(page).locator(".assistant")
    await expect(answer).to_contain_text("slow 2/10.")
    await page.reload()
    await expect(page.locator("#live")).to_have_text("live")
    text_after_reload = await answer.inner_text()
    assert "slow 10/10" not in text_after_reload, "the reload came too late to test anything"
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(answer).to_have_text(SLOW_TEXT.strip())
    await expect(last_turn(page).locator(".user-text")).to_have_text("[[slow: 6]]")
    assert (await sending)[-1].name == "done"
    assert alice.errors == []


async def test_model_markup_shows_as_text(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "markup")
    await open_loop(alice, server, loop)
    await send(page, "[[html]] <script>alert('user')</script>")
    answer = last_turn(page).locator(".assistant")
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(answer).to_contain_text("<script>alert(1)</script>")
    await expect(answer).to_contain_text("<img src=x onerror=alert(1)>")
    await expect(answer.locator("pre code")).to_contain_text("<script>alert(2)</script>")
    await expect(last_turn(page).locator(".user-text")).to_contain_text("<script>alert('user')")
    assert await page.locator("#turns script").count() == 0
    assert await page.locator("#turns img").count() == 0
    assert await page.locator("#turns [onerror]").count() == 0
    assert await page.locator("#turns a[href^='javascript']").count() == 0
    # The same after a reload, when the answer comes from history.
    await page.reload()
    await expect(answer).to_contain_text("<img src=x onerror=alert(1)>")
    assert await page.locator("#turns img").count() == 0
    assert alice.dialogs == []


async def test_a_write_shows_its_diff(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "diff")
    await turn(
        server.http, loop, "[[write: poem.txt :: roses\nviolets]]", permission_mode="acceptEdits"
    )
    await open_loop(alice, server, loop)
    tool = last_turn(page).locator("details.tool")
    await tool.locator("summary").click()
    await expect(tool.locator("pre.diff .add")).to_have_text(["+roses\n", "+violets\n"])
    await expect(tool.locator("pre.tool-input")).to_contain_text('"file_path": "poem.txt"')


# ---- view links ------------------------------------------------------------------------------


async def test_a_view_link_is_read_only_and_live(anonymous: Watch, server) -> None:
    page = anonymous.page
    loop = await new_loop(server, "shared with the thread")
    await turn(server.http, loop, "[[write: shared.txt :: hi]]", permission_mode="acceptEdits")
    link = (await server.http.post(f"/loops/{loop}/view-links")).json()["url"]
    await page.goto(link)
    await expect(page.locator("#live")).to_have_text("live")
    await expect(page.locator(".badge.readonly")).to_have_text("read-only view")
    await expect(last_turn(page).locator(".assistant")).to_contain_text("Wrote shared.txt.")
    for control in ("#composer", "#stop", "#send", "#logout"):
        assert await page.locator(control).count() == 0, control
    # A turn that asks: the viewer sees it wait and end, with no buttons to press.
    asking = asyncio.create_task(turn(server.http, loop, "[[bash: echo x > viewed.txt]]"))
    choice = last_turn(page).locator(".choice")
    await expect(choice).to_contain_text("Waiting for an answer.")
    assert await page.locator("#turns button").count() == 0
    pending = (await server.http.get(f"/loops/{loop}")).json()["current_turn"]["pending_choice_id"]
    await server.http.post(f"/loops/{loop}/choices/{pending}", json={"allow": False})
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await expect(choice.locator(".outcome")).to_have_text("Answered by api")
    await asking
    assert anonymous.errors == []


async def test_a_tampered_or_expired_link_is_refused(anonymous: Watch, server) -> None:
    page = anonymous.page
    loop = await new_loop(server, "refused")
    link = (await server.http.post(f"/loops/{loop}/view-links")).json()["url"]
    url = httpx.URL(link)
    grant = url.params["grant"]
    tampered = grant[:12] + ("x" if grant[12] != "x" else "y") + grant[13:]
    response = await page.goto(str(url.copy_set_param("grant", tampered)))
    assert response.status == 403
    await expect(page.locator("h1")).to_have_text("This link cannot be used")
    await expect(page.locator("main")).to_contain_text("not valid")
    short = (await server.http.post(f"/loops/{loop}/view-links", json={"days": 0.00001})).json()
    await asyncio.sleep(1.2)  # 0.00001 days is under a second
    response = await page.goto(short["url"])
    assert response.status == 403
    await expect(page.locator("main")).to_contain_text("expired")


# ---- the screenshot --------------------------------------------------------------------------


async def test_screenshot_of_a_loop_page(alice: Watch, server, tmp_path) -> None:
    page = alice.page
    loop = await new_loop(server, "tidy the release notes")
    await turn(server.http, loop, "[[long: 24]]")
    await turn(
        server.http,
        loop,
        "[[write: NOTES.md :: # Release 1.2\n\n- faster start\n- view links]]",
        permission_mode="acceptEdits",
    )
    await open_loop(alice, server, loop)
    await send(page, "[[bash: echo shipped > released.txt]]")
    await last_turn(page).locator("button.allow").click()
    await expect(last_turn(page).locator(".state")).to_have_text("done")
    await page.locator("article.turn").nth(1).locator("details.tool summary").click()
    target = Path(os.environ.get("LOOPBRIDGE_SCREENSHOT") or tmp_path / "loop-page.png")
    shot = await page.screenshot(path=str(target), full_page=True)
    assert len(shot) > 10_000


class CuttableProxy:
    """A TCP relay in front of the server whose open connections a test can cut, as a
    flaky network would; new connections go on working."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[bytes] = []
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._open |= {writer, upstream}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, up: bool) -> None:
            try:
                while chunk := await source.read(65536):
                    if up:
                        self.requests.append(chunk)
                    sink.write(chunk)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream, True), pipe(upstream_reader, writer, False))


async def test_a_dropped_connection_resumes_without_a_gap(alice: Watch, server) -> None:
    page = alice.page
    loop = await new_loop(server, "reconnect")
    proxy = CuttableProxy(int(server.url.rsplit(":", 1)[1]))
    base = await proxy.start()
    try:
        await page.goto(f"{base}/loops/{loop}")
        await expect(page.locator("#live")).to_have_text("live")
        sending = asyncio.create_task(turn(server.http, loop, "[[slow: 8]]"))
        answer = last_turn(page).locator(".assistant")
        await expect(answer).to_contain_text("slow 1/10.")
        proxy.cut()
        await expect(page.locator("#live")).to_have_text("reconnecting…")
        # The browser's EventSource reconnects by itself, saying where it was.
        await expect(page.locator("#live")).to_have_text("live")
        resumed = [r for r in proxy.requests if b"/events?" in r and b"last-event-id:" in r.lower()]
        assert resumed, "the EventSource did not send Last-Event-ID"
        await expect(last_turn(page).locator(".state")).to_have_text("done")
        await expect(answer).to_have_text(SLOW_TEXT.strip())
        assert (await sending)[-1].name == "done"
    finally:
        await proxy.stop()
