"""A loop's repo may name a branch: the settings' `[repos.NAME] branch`, or the loop's own
(made from it when the remote has none). The remote is a local bare git repository."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import start_server, stop_server
from tests.sse import names, text_of, turn

BYPASS = {"permission_mode": "bypassPermissions"}
SHOW = "[[bash: git rev-parse --abbrev-ref HEAD; cat WHICH.txt]]"


def git(*args: str, cwd: Path) -> None:
    command = ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args]
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


def make_remote(root: Path) -> Path:
    """A bare repository with `main` (WHICH.txt = main) and `release` (WHICH.txt = release)."""
    bare = root / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    work = root / "seed"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "WHICH.txt").write_text("main\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "main", cwd=work)
    git("checkout", "-q", "-b", "release", cwd=work)
    (work / "WHICH.txt").write_text("release\n")
    git("commit", "-qam", "release", cwd=work)
    git("push", "-q", str(bare), "main", "release", cwd=work)
    return bare


async def refusing_git_host() -> tuple[asyncio.Server, int]:
    """An HTTP server that asks every request for credentials, as a private host does."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=git\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def repos(standin, tmp_path_factory):
    root = tmp_path_factory.mktemp("branches")
    bare = await asyncio.to_thread(make_remote, root)
    private, port = await refusing_git_host()
    config = root / "loopbridge.toml"
    config.write_text(
        f"""
[repos.plain]
url = "{bare}"

[repos.app]
url = "{bare}"
branch = "release"

[repos.nobranch]
url = "{bare}"
branch = "no-such-branch"

[repos.gone]
url = "{root / "no-such-repo.git"}"

[repos.private]
url = "http://127.0.0.1:{port}/team/app.git"
"""
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPBRIDGE_CONFIG", str(config))
        server = await start_server(root / "home")
        server.standin = standin
        yield server
        await stop_server(server)
    private.close()


async def create(server, **body) -> dict:
    r = await server.http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def head_and_file(server, loop: str) -> str:
    evs = await turn(server.http, loop, SHOW, **BYPASS)
    assert names(evs)[-1] == "done", evs
    return text_of(evs)


async def test_the_remotes_default_branch_without_a_setting(repos):
    loop = await create(repos, repo="plain")
    assert loop["branch"] is None
    assert "main\nmain" in await head_and_file(repos, loop["id"])


async def test_the_configured_branch_is_checked_out(repos):
    loop = await create(repos, repo="app")
    assert loop["branch"] == "release"
    assert "release\nrelease" in await head_and_file(repos, loop["id"])
    detail = (await repos.http.get(f"/loops/{loop['id']}")).json()
    assert detail["branch"] == "release"


async def test_a_missing_branch_is_made_from_the_configured_one(repos):
    loop = await create(repos, repo="app", branch="fix-login")
    assert loop["branch"] == "fix-login"
    assert "fix-login\nrelease" in await head_and_file(repos, loop["id"])


async def test_an_existing_remote_branch_is_checked_out(repos):
    loop = await create(repos, repo="plain", branch="release")
    assert "release\nrelease" in await head_and_file(repos, loop["id"])


async def test_a_file_uploaded_before_the_first_turn_lands_in_the_clone(repos):
    loop = await create(repos, repo="app", branch="upload-first")
    r = await repos.http.put(f"/loops/{loop['id']}/files/uploads/a.txt", content=b"up")
    assert r.status_code == 201, r.text
    evs = await turn(repos.http, loop["id"], "[[bash: cat uploads/a.txt WHICH.txt]]", **BYPASS)
    assert "up" in text_of(evs) and "release" in text_of(evs)
    listed = (await repos.http.get(f"/loops/{loop['id']}/files")).json()["data"]
    assert [e["path"] for e in listed] == ["WHICH.txt", "uploads"]  # .git is never listed


@pytest.mark.parametrize(
    ("repo", "words"),
    [
        ("gone", ["cannot clone", "does not exist"]),
        ("nobranch", ["cannot clone", "no-such-branch"]),
        ("private", ["cannot clone", "terminal prompts disabled"]),
    ],
)
async def test_a_clone_that_fails_ends_the_turn_with_gits_message(repos, repo, words):
    loop = await create(repos, repo=repo)
    evs = await asyncio.wait_for(turn(repos.http, loop["id"], "hello"), 60)
    assert names(evs) == ["error"]
    assert evs[0].data["code"] == "sandbox_spawn_failed"
    for word in words:
        assert word in evs[0].data["message"], evs[0].data["message"]
    # The loop stays usable: the next turn tries again, and fails the same way.
    again = await asyncio.wait_for(turn(repos.http, loop["id"], "hello"), 60)
    assert names(again) == ["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"repo": "app", "branch": "-x"},
        {"repo": "app", "branch": "a..b"},
        {"repo": "app", "branch": "has space"},
        {"repo": "app", "branch": "x" * 201},
        {"repo": "app", "branch": ""},
        {"branch": "main"},  # no repo to branch from
    ],
)
async def test_bad_branches_are_refused(repos, body):
    r = await repos.http.post("/loops", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_branch"
