"""Files [ext] through the HTTP API: upload, download, list, attachments and share_file,
with the real agent CLI and the stand-in model, local sandbox."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from core.files import IMAGE_LIMIT, UPLOAD_LIMIT
from tests.polling import until
from tests.sse import Ev, events, names, text_of, turn

BYPASS = {"permission_mode": "bypassPermissions"}
# A 1×1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
# Paths that must never reach outside the working directory, as URL path text (already
# percent-encoded where a client would have to) and as plain text (query, JSON).
UNSAFE_URL_PATHS = [
    "/etc/passwd",  # absolute: .../files//etc/passwd
    "%2e%2e/secret.txt",
    "a/%2e%2e/%2e%2e/secret.txt",
    "%2E%2E/%2E%2E/etc/passwd",
    "x%00y",
    "out/passwd",  # through a symlinked directory leading out
    "passwd_link",  # a symlink leading out
    "dangling_out",  # a symlink leading out, to nothing
]
UNSAFE_PATHS = [
    "/etc/passwd",
    "../secret.txt",
    "a/../../secret.txt",
    "x\x00y",
    "out/passwd",
    "passwd_link",
    "dangling_out",
]


async def new_loop(server, **body) -> str:
    r = await server.http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def put(server, loop: str, path: str, data: bytes | AsyncIterator[bytes]):
    return await server.http.put(f"/loops/{loop}/files/{path}", content=data)


def error_code(response) -> str:
    return response.json()["error"]["code"]


def workdir(server, loop: str):
    return server.engine.sandbox.workdir(loop)


@pytest.fixture
async def hostile(server, tmp_path):
    """A loop whose working directory holds symlinks leading out, and a secret beside it."""
    loop = await new_loop(server)
    assert (await put(server, loop, "inside.txt", b"inside")).status_code == 201
    root = workdir(server, loop)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("outside secret")
    (root.parent / "secret.txt").write_text("beside the workdir")
    os.symlink(outside, root / "out")
    os.symlink(outside / "passwd", root / "passwd_link")
    os.symlink(tmp_path / "nothing-here", root / "dangling_out")
    os.symlink("inside.txt", root / "inner_link")
    (root / "a").mkdir()
    return loop


# ---- upload, download, list ------------------------------------------------------------


async def test_upload_then_the_agent_reads_it(server):
    loop = await new_loop(server)
    r = await put(server, loop, "notes/hello.txt", b"hello from the api\n")
    assert r.status_code == 201, r.text
    assert r.json() == {"path": "notes/hello.txt", "size": 19}
    evs = await turn(server.http, loop, "[[bash: cat notes/hello.txt]]", **BYPASS)
    assert names(evs)[-1] == "done"
    assert "hello from the api" in text_of(evs)


async def test_what_the_agent_writes_downloads_byte_for_byte(server):
    loop = await new_loop(server)
    command = "mkdir -p out && for i in $(seq 1 2000); do echo line $i; done > out/report.txt"
    evs = await turn(server.http, loop, f"[[bash: {command}]]", **BYPASS)
    assert names(evs)[-1] == "done"
    expected = "".join(f"line {i}\n" for i in range(1, 2001)).encode()
    r = await server.http.get(f"/loops/{loop}/files/out/report.txt")
    assert r.status_code == 200
    assert r.content == expected
    assert r.headers["content-length"] == str(len(expected))
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["content-disposition"].startswith("attachment")


async def test_binary_upload_round_trips_and_replaces(server):
    loop = await new_loop(server)
    data = os.urandom(3 * 1024 * 1024)  # over the 2 MiB cap of other bodies
    assert (await put(server, loop, "blob.bin", data)).status_code == 201
    r = await server.http.get(f"/loops/{loop}/files/blob.bin")
    assert r.content == data
    assert r.headers["content-type"] == "application/octet-stream"
    assert (await put(server, loop, "blob.bin", b"short")).json()["size"] == 5
    assert (await server.http.get(f"/loops/{loop}/files/blob.bin")).content == b"short"
    assert not [p for p in workdir(server, loop).iterdir() if p.name.startswith(".upload-")]


async def test_list_one_directory_without_git(server):
    loop = await new_loop(server)
    assert (await server.http.get(f"/loops/{loop}/files")).json() == {"data": []}
    await put(server, loop, "top.txt", b"12345")
    await put(server, loop, "sub/inner.txt", b"x")
    (workdir(server, loop) / ".git").mkdir()
    data = (await server.http.get(f"/loops/{loop}/files")).json()["data"]
    assert [(e["path"], e["type"]) for e in data] == [("sub", "dir"), ("top.txt", "file")]
    top = data[1]
    assert top["size"] == 5 and top["modified_at"].endswith("Z")
    sub = (await server.http.get(f"/loops/{loop}/files", params={"path": "sub"})).json()
    assert [(e["path"], e["size"]) for e in sub["data"]] == [("sub/inner.txt", 1)]


async def test_wrong_kinds_and_missing_files(server):
    loop = await new_loop(server)
    await put(server, loop, "dir/file.txt", b"x")
    os.mkfifo(workdir(server, loop) / "pipe")  # opening it must not wait for a writer
    cases = [
        (server.http.get(f"/loops/{loop}/files/nope.txt"), 404, "file_not_found"),
        (server.http.get(f"/loops/{loop}/files/dir"), 400, "not_a_file"),
        (server.http.get(f"/loops/{loop}/files", params={"path": "nope"}), 404, "file_not_found"),
        (
            server.http.get(f"/loops/{loop}/files", params={"path": "dir/file.txt"}),
            400,
            "not_a_directory",
        ),
        (put(server, loop, "dir", b"x"), 400, "not_a_file"),
        (put(server, loop, "dir/file.txt/below", b"x"), 400, "not_a_directory"),
        (server.http.get(f"/loops/{loop}/files/pipe"), 404, "file_not_found"),
    ]
    for request, status, code in cases:
        r = await request
        assert (r.status_code, error_code(r)) == (status, code), r.text
        assert r.json()["error"]["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize("path", UNSAFE_URL_PATHS)
async def test_unsafe_paths_are_refused_for_download_and_upload(server, hostile, path):
    for r in (
        await server.http.get(f"/loops/{hostile}/files/{path}"),
        await put(server, hostile, path, b"written"),
    ):
        assert r.status_code == 400, r.text
        assert error_code(r) == "invalid_path"
    outside_file = workdir(server, hostile).parent / "secret.txt"
    assert outside_file.read_text() == "beside the workdir"


@pytest.mark.parametrize("path", [*UNSAFE_PATHS, "out"])
async def test_unsafe_paths_are_refused_for_listing(server, hostile, path):
    r = await server.http.get(f"/loops/{hostile}/files", params={"path": path})
    assert r.status_code == 400, r.text
    assert error_code(r) == "invalid_path"


async def test_symlinks_inside_read_but_never_written_through(server, hostile):
    r = await server.http.get(f"/loops/{hostile}/files/inner_link")
    assert r.content == b"inside"
    r = await put(server, hostile, "inner_link", b"replaced")
    assert (r.status_code, error_code(r)) == (400, "invalid_path")
    listed = (await server.http.get(f"/loops/{hostile}/files")).json()["data"]
    # Links leading out are not listed; the one inside shows as what it points to.
    assert {e["path"]: e["type"] for e in listed} == {
        "a": "dir",
        "inside.txt": "file",
        "inner_link": "file",
    }


async def test_upload_over_the_limit_is_refused_while_it_streams(server):
    loop = await new_loop(server)
    sent = 0

    async def body() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        nonlocal sent
        chunk = b"\0" * (1024 * 1024)
        for _ in range(26):
            sent += len(chunk)
            yield chunk

    r = await put(server, loop, "big.bin", body())
    assert (r.status_code, error_code(r)) == (400, "file_too_large")
    r = await server.http.put(
        f"/loops/{loop}/files/big.bin",
        headers={"Content-Length": str(UPLOAD_LIMIT + 1)},
        content=b"\0" * (UPLOAD_LIMIT + 1),
    )
    assert (r.status_code, error_code(r)) == (400, "file_too_large")
    assert list(workdir(server, loop).iterdir()) == []


async def test_archived_loop_files_are_read_only(server):
    loop = await new_loop(server)
    await put(server, loop, "kept.txt", b"kept")
    assert (await server.http.delete(f"/loops/{loop}")).status_code == 204
    r = await put(server, loop, "kept.txt", b"changed")
    assert (r.status_code, error_code(r)) == (400, "loop_archived")
    assert (await server.http.get(f"/loops/{loop}/files/kept.txt")).content == b"kept"
    listed = (await server.http.get(f"/loops/{loop}/files")).json()["data"]
    assert [e["path"] for e in listed] == ["kept.txt"]


async def test_owner_checks_come_first(server):
    loop = await new_loop(server)
    other = server.client(await server.token_for("mallory"))
    async with other:
        for r in (
            await other.get(f"/loops/{loop}/files"),
            await other.get(f"/loops/{loop}/files/x.txt"),
            await other.put(f"/loops/{loop}/files/x.txt", content=b"x"),
            await other.put(f"/loops/{loop}/files/%2e%2e/x", content=b"x"),
        ):
            assert (r.status_code, error_code(r)) == (403, "not_loop_owner")
    for r in (
        await server.http.get("/loops/loop_nope/files"),
        await server.http.put("/loops/loop_nope/files/x", content=b"x" * 100),
    ):
        assert (r.status_code, error_code(r)) == (404, "loop_not_found")


async def test_files_are_described_in_the_openapi_document(server):
    spec = (await server.http.get("/openapi.json")).json()
    item = spec["paths"]["/api/v1/loops/{loop_id}/files/{path}"]
    assert {"get", "put"} <= set(item)
    assert "201" in item["put"]["responses"] and "403" in item["put"]["responses"]
    assert "application/octet-stream" in item["put"]["requestBody"]["content"]
    assert "/api/v1/loops/{loop_id}/files" in spec["paths"]


# ---- attachments ------------------------------------------------------------------------


async def test_an_attached_image_reaches_the_model_as_an_image_block(server):
    loop = await new_loop(server)
    await put(server, loop, "uploads/shot.png", PNG)
    await put(server, loop, "uploads/log.txt", b"a log")
    attachments = [{"path": "uploads/shot.png"}, {"path": "uploads/log.txt"}]
    evs = await turn(server.http, loop, "[[image]] look", attachments=attachments)
    assert names(evs)[-1] == "done"
    assert hashlib.sha256(PNG).hexdigest() in text_of(evs)
    message = next(
        m for m in reversed(server.standin_requests()[-1]["messages"]) if m["role"] == "user"
    )
    images = [b for b in message["content"] if b["type"] == "image"]
    assert len(images) == 1
    assert images[0]["source"]["media_type"] == "image/png"
    assert base64.b64decode(images[0]["source"]["data"]) == PNG
    text = " ".join(b["text"] for b in message["content"] if b["type"] == "text")
    assert "uploads/log.txt" in text and "uploads/shot.png" in text
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert history[-1]["attachments"] == attachments
    assert history[-1]["user_text"] == "[[image]] look"


async def test_other_files_are_named_to_the_agent(server):
    loop = await new_loop(server)
    await put(server, loop, "data.csv", b"a,b\n1,2\n")
    evs = await turn(server.http, loop, "please read", attachments=[{"path": "data.csv"}])
    assert "data.csv" in text_of(evs)
    last = server.standin_requests()[-1]["messages"]
    assert not any(
        b.get("type") == "image" for m in last if m["role"] == "user" for b in m["content"]
    )


async def test_attachment_errors_come_before_the_stream(server):
    loop = await new_loop(server)
    await put(server, loop, "dir/x.txt", b"x")
    big = workdir(server, loop) / "big.png"
    big.write_bytes(PNG + b"\0" * IMAGE_LIMIT)
    big_text = workdir(server, loop) / "big.txt"
    big_text.write_bytes(b"\0" * (IMAGE_LIMIT + 1))
    cases = [
        ([{"path": "missing.png"}], "attachment_not_found"),
        ([{"path": "dir"}], "attachment_not_found"),
        ([{"path": "big.png"}], "attachment_too_large"),
        ([{"path": "dir/x.txt"}] * 21, "too_many_attachments"),
        ([{"path": "/etc/passwd"}], "invalid_path"),
        ([{"path": "../x"}], "invalid_path"),
    ]
    for attachments, code in cases:
        r = await server.http.post(
            f"/loops/{loop}/messages", json={"content": "hi", "attachments": attachments}
        )
        assert (r.status_code, error_code(r)) == (400, code), r.text
    # A big file that is not an image is only named: no size limit applies.
    evs = await turn(server.http, loop, "fine", attachments=[{"path": "big.txt"}])
    assert names(evs)[-1] == "done"
    assert len((await server.http.get(f"/loops/{loop}/messages")).json()["data"]) == 1


@pytest.mark.parametrize("path", UNSAFE_PATHS)
async def test_unsafe_attachment_paths_are_refused(server, hostile, path):
    r = await server.http.post(
        f"/loops/{hostile}/messages", json={"content": "hi", "attachments": [{"path": path}]}
    )
    assert (r.status_code, error_code(r)) == (400, "invalid_path"), r.text


async def test_the_idempotency_hash_covers_attachments(server):
    loop = await new_loop(server)
    await put(server, loop, "a.txt", b"a")
    await put(server, loop, "b.txt", b"b")
    headers = {"Idempotency-Key": f"att-{loop}"}
    first = await turn(server.http, loop, "x", attachments=[{"path": "a.txt"}], headers=headers)
    again = await turn(server.http, loop, "x", attachments=[{"path": "a.txt"}], headers=headers)
    assert [e.id for e in again] == [e.id for e in first]
    r = await server.http.post(
        f"/loops/{loop}/messages",
        json={"content": "x", "attachments": [{"path": "b.txt"}]},
        headers=headers,
    )
    assert (r.status_code, error_code(r)) == (409, "idempotency_key_reused")


# ---- share_file -------------------------------------------------------------------------


async def _watch_until(server, loop: str, name: str, seen: list[Ev]) -> None:
    async for ev in events(server.http, "GET", f"/loops/{loop}/events"):
        seen.append(ev)
        if ev.name == name:
            return


async def test_share_file_reaches_every_stream_the_history_and_stays_downloadable(server):
    loop = await new_loop(server)
    await put(server, loop, "out/report.csv", b"q,total\n3,42\n")
    watched: list[Ev] = []
    watcher = asyncio.create_task(_watch_until(server, loop, "done", watched))
    await until(
        lambda: (
            server.engine._runtimes.get(loop)
            and server.engine._runtimes[loop].channel.subscriber_count > 0
        ),
        what="the watcher",
    )
    # The default permission mode: share_file must not ask anyone.
    evs = await turn(server.http, loop, "[[share: out/report.csv :: Q3 numbers]]")
    await asyncio.wait_for(watcher, 30)
    assert "requires_choice" not in names(evs)
    assert names(evs)[-1] == "done", evs
    shared = [e for e in evs if e.name == "file_shared"]
    expected = {
        "path": "out/report.csv",
        "size": 13,
        "media_type": "text/csv",
        "caption": "Q3 numbers",
    }
    assert [e.data for e in shared] == [expected]
    assert [e.data for e in watched if e.name == "file_shared"] == [expected]
    assert [e.id for e in watched if e.name == "file_shared"] == [shared[0].id]
    assert text_of(evs).startswith("Shared")
    calls = [e.data["tool"] for e in evs if e.name == "tool_call"]
    assert calls == ["ToolSearch", "mcp__loopbridge__share_file"]
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert history[-1]["files_shared"] == [expected]
    r = await server.http.get(f"/loops/{loop}/files/out/report.csv")
    assert r.content == b"q,total\n3,42\n"


@pytest.mark.parametrize("mode", ["plan", "dontAsk", "acceptEdits", "bypassPermissions"])
async def test_share_file_needs_no_permission_in_any_mode(server, mode):
    loop = await new_loop(server)
    await put(server, loop, "pic.png", PNG)
    evs = await turn(server.http, loop, "[[share: pic.png]]", permission_mode=mode)
    assert "requires_choice" not in names(evs)
    shared = [e.data for e in evs if e.name == "file_shared"]
    assert shared == [
        {"path": "pic.png", "size": len(PNG), "media_type": "image/png", "caption": None}
    ]


async def test_share_file_takes_the_agents_absolute_path(server):
    loop = await new_loop(server)
    await put(server, loop, "made.txt", b"made")
    absolute = workdir(server, loop) / "made.txt"
    evs = await turn(server.http, loop, f"[[share: {absolute} :: done]]")
    assert [e.data["path"] for e in evs if e.name == "file_shared"] == ["made.txt"]


@pytest.mark.parametrize(
    "path", ["missing.txt", "/etc/passwd", "../secret.txt", "out/passwd", "passwd_link", "a"]
)
async def test_share_file_of_a_bad_path_is_an_error_to_the_agent_not_an_event(
    server, hostile, path
):
    evs = await turn(server.http, hostile, f"[[share: {path}]]")
    assert names(evs)[-1] == "done"
    assert "file_shared" not in names(evs)
    results = [e.data["ok"] for e in evs if e.name == "tool_result"]
    assert results == [True, False]  # ToolSearch, then share_file
    assert text_of(evs).startswith("Share failed")
    history = (await server.http.get(f"/loops/{hostile}/messages")).json()["data"]
    assert history[-1]["files_shared"] == []
