"""Files [ext] with agents in Podman containers: the agent (uid 1000 inside) reads and
writes what the API uploads, the API serves what it writes, and share_file maps the
agent's /work paths to the host working directory."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from core.sandbox.podman import AGENT_UID
from tests.conftest import Server, start_server, stop_server
from tests.podman import skip_without_podman
from tests.sse import names, text_of, turn
from tests.test_files import PNG

skip_without_podman()

BYPASS = {"permission_mode": "bypassPermissions"}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def box(standin, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    server = await start_server(
        tmp_path_factory.mktemp("files-box"), sandbox="podman", sandbox_memory="768m"
    )
    server.standin = standin
    yield server
    await stop_server(server)


async def test_files_go_both_ways_with_an_agent_in_a_container(box):
    loop = (await box.http.post("/loops", json={})).json()["id"]
    # Before the first turn, and again while its container runs.
    r = await box.http.put(f"/loops/{loop}/files/uploads/note.txt", content=b"from the api\n")
    assert r.status_code == 201, r.text
    command = (
        "cat uploads/note.txt && echo appended >> uploads/note.txt && "
        "echo made > uploads/made.txt && id -u"
    )
    evs = await turn(box.http, loop, f"[[bash: {command}]]", **BYPASS)
    assert names(evs)[-1] == "done", evs
    assert "from the api" in text_of(evs)
    r = await box.http.get(f"/loops/{loop}/files/uploads/note.txt")
    assert r.content == b"from the api\nappended\n"
    assert (await box.http.get(f"/loops/{loop}/files/uploads/made.txt")).content == b"made\n"
    r = await box.http.put(f"/loops/{loop}/files/later/second.txt", content=b"second\n")
    assert r.status_code == 201
    workdir = box.engine.sandbox.workdir(loop)
    if os.geteuid() == 0:  # the agent's uid owns what the API wrote, parents included
        assert (workdir / "later").stat().st_uid == AGENT_UID
        assert (workdir / "later" / "second.txt").stat().st_uid == AGENT_UID
    evs = await turn(box.http, loop, "[[bash: echo more >> later/second.txt]]", **BYPASS)
    assert [e.data["ok"] for e in evs if e.name == "tool_result"] == [True]
    assert (workdir / "later" / "second.txt").read_bytes() == b"second\nmore\n"


async def test_share_file_maps_the_containers_paths(box):
    loop = (await box.http.post("/loops", json={})).json()["id"]
    evs = await turn(box.http, loop, "[[bash: mkdir -p out && echo 1,2 > out/r.csv]]", **BYPASS)
    assert names(evs)[-1] == "done"
    for path in ("/work/out/r.csv", "out/r.csv"):
        evs = await turn(box.http, loop, f"[[share: {path} :: numbers]]")
        shared = [e.data for e in evs if e.name == "file_shared"]
        assert shared == [
            {"path": "out/r.csv", "size": 4, "media_type": "text/csv", "caption": "numbers"}
        ], path
    evs = await turn(box.http, loop, "[[share: /etc/passwd]]")
    assert "file_shared" not in names(evs)
    assert text_of(evs).startswith("Share failed")


async def test_an_image_attachment_from_a_container_loop(box):
    loop = (await box.http.post("/loops", json={})).json()["id"]
    await box.http.put(f"/loops/{loop}/files/shot.png", content=PNG)
    evs = await turn(box.http, loop, "[[image]]", attachments=[{"path": "shot.png"}])
    assert names(evs)[-1] == "done"
    request = box.standin_requests()[-1]
    user = next(m for m in reversed(request["messages"]) if m["role"] == "user")
    images = [b for b in user["content"] if b["type"] == "image"]
    assert [base64.b64decode(b["source"]["data"]) for b in images] == [PNG]
