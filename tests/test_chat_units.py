"""The platform-neutral parts of issue 10's chat work, on their own: options, routes,
thread context bounds, file names, where downloads may go, tool lines."""

from __future__ import annotations

import httpx
import pytest

from adapters.attachments import fetch, safe_name
from adapters.chat_thread import DownloadFailed
from adapters.context import MAX_CHARS, ThreadMessage, thread_context
from adapters.routing import LoopOptions, OptionError, Route, Routes, parse_options
from adapters.views import activity_line


def test_leading_options_are_taken_and_the_rest_is_the_message() -> None:
    found, rest = parse_options("repo=app branch=fix-login fix the flaky test a=b")
    assert found == {"repo": "app", "branch": "fix-login"}
    assert rest == "fix the flaky test a=b"
    assert parse_options("profile=a,b mode=plan go") == (
        {"profiles": "a,b", "permission_mode": "plan"},
        "go",
    )
    with pytest.raises(OptionError, match="colour"):
        parse_options("colour=red go")


def test_the_channel_wins_over_its_workspace_and_a_new_repo_drops_the_branch() -> None:
    routes = Routes(
        {
            "C1": Route(repo="app", branch="release", permission_mode="acceptEdits"),
            "T1": Route(repo="web"),
        }
    )
    assert routes.defaults("C1", "T1").repo == "app"
    assert routes.defaults("C2", "T1") == LoopOptions(repo="web")
    options, rest = routes.choose("repo=web fix it", "C1", "T1")
    assert rest == "fix it"
    assert (options.repo, options.branch, options.permission_mode) == ("web", None, "acceptEdits")
    options, _ = routes.choose("branch=x profiles=p,q go", "C1", "T1")
    assert (options.repo, options.branch, options.profiles) == ("app", "x", ("p", "q"))
    with pytest.raises(OptionError, match="not a permission mode"):
        routes.choose("mode=yolo go", "C1")


def test_routes_come_from_the_settings_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "loopbridge.toml"
    config.write_text('[routes.slack.C9]\nrepo = "app"\n[routes.discord."123"]\nvault = "v"\n')
    monkeypatch.setenv("LOOPBRIDGE_CONFIG", str(config))
    assert Routes.load("slack").defaults("C9").repo == "app"
    assert Routes.load("discord").defaults("123").vault == "v"
    assert Routes.load("slack").defaults("C0") == LoopOptions()


def message(n: int, size: int = 10) -> ThreadMessage:
    return ThreadMessage(f"slack:U{n}", f"person {n}", f"m{n} " + "x" * size)


def test_context_keeps_the_root_and_the_newest_within_50_messages() -> None:
    text = thread_context([message(n) for n in range(80)])
    assert text.startswith("Earlier in this thread (50 messages; 30 older messages left out):")
    assert "m0 " in text and "m79 " in text and "m30 " not in text and "m31 " in text
    assert "[… 30 messages left out …]" in text


def test_context_stays_under_20000_characters() -> None:
    text = thread_context([message(n, size=3000) for n in range(30)])
    assert len(text) <= MAX_CHARS + 200  # the header and blank line
    assert "m0 " in text and "m29 " in text and "left out" in text
    assert thread_context([]) == "" and thread_context([message(1, 0)]).count("\n[") == 1


def test_file_names_are_one_plain_segment() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("screen shot (1).png") == "screen_shot_1_.png"
    assert safe_name("..") == "file" and safe_name("") == "file"
    long = safe_name("a" * 300 + ".png")
    assert len(long) == 120 and long.endswith(".png")


async def test_a_download_goes_only_to_the_platforms_hosts() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=b"data", headers={"content-type": "image/png"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        for url in (
            "http://169.254.169.254/latest",
            "file:///etc/passwd",
            "https://files.slack.com.evil.example/x",
        ):
            with pytest.raises(DownloadFailed):
                async with fetch(http, url, hosts=frozenset({"slack.com"})):
                    pass
        async with fetch(http, "https://files.slack.com/x", hosts=frozenset({"slack.com"})) as c:
            assert b"".join([chunk async for chunk in c]) == b"data"
    assert seen == ["https://files.slack.com/x"]


def test_a_file_tools_line_keeps_the_files_name() -> None:
    path = "/var/lib/loopbridge/loops/loop_0123456789abcdef/work/" + "deep/" * 10 + "report.csv"
    line = activity_line("Write", path, True)
    assert line.startswith("ran *Write* `…") and line.endswith("/report.csv`")
