"""LoopClient's file methods, as the adapters use them: upload, list, streamed download,
attachments on send, and the file_shared event — over HTTP and in-process."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from bridge.client import LoopApiError, LoopClient
from bridge.server.app import create_app
from tests.test_files import PNG


@pytest.fixture(params=["http", "in_process"])
async def client(request, server) -> AsyncIterator[LoopClient]:
    if request.param == "http":
        made = LoopClient(server.url, server.token)
    else:
        made = LoopClient.in_process(create_app(server.engine, manage_engine=False), server.token)
    async with made:
        yield made


async def test_upload_list_and_streamed_download(client):
    loop = (await client.create_loop(title="files")).id
    data = os.urandom(1024 * 1024 + 7)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    written = await client.upload_file(loop, "uploads/blob.bin", chunks())
    assert (written.path, written.size) == ("uploads/blob.bin", len(data))
    await client.upload_file(loop, "uploads/shot.png", PNG)
    listed = await client.list_files(loop, "uploads")
    assert [(e.path, e.type, e.size) for e in listed.data] == [
        ("uploads/blob.bin", "file", len(data)),
        ("uploads/shot.png", "file", len(PNG)),
    ]
    assert [e.path for e in (await client.list_files(loop)).data] == ["uploads"]
    async with client.download_file(loop, "uploads/blob.bin") as download:
        assert download.size == len(data)
        assert download.media_type == "application/octet-stream"
        received = [chunk async for chunk in download.chunks]
    assert b"".join(received) == data
    async with client.download_file(loop, "uploads/shot.png") as download:
        assert download.media_type == "image/png"
        assert await download.read() == PNG


async def test_errors_arrive_before_any_bytes(client):
    loop = (await client.create_loop()).id
    with pytest.raises(LoopApiError) as missing:
        async with client.download_file(loop, "nope.txt"):
            pass
    assert (missing.value.status, missing.value.code) == (404, "file_not_found")
    for path in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(LoopApiError) as unsafe:
            await client.upload_file(loop, path, b"x")
        assert unsafe.value.code == "invalid_path", path
        with pytest.raises(LoopApiError) as unsafe:
            async with client.download_file(loop, path):
                pass
        assert unsafe.value.code == "invalid_path", path


async def test_send_with_attachments_and_a_shared_file(client):
    loop = (await client.create_loop()).id
    await client.upload_file(loop, "uploads/shot.png", PNG)
    events = [
        e async for e in client.send(loop, "[[image]] what is it", attachments=["uploads/shot.png"])
    ]
    text = "".join(e.data.text for e in events if e.event == "assistant_delta")
    assert hashlib.sha256(PNG).hexdigest() in text
    history = await client.history(loop)
    assert [a.path for a in history.data[-1].attachments] == ["uploads/shot.png"]
    events = [e async for e in client.send(loop, "[[share: uploads/shot.png :: the shot]]")]
    shared = [e.data.model_dump() for e in events if e.event == "file_shared"]
    assert shared == [
        {
            "path": "uploads/shot.png",
            "size": len(PNG),
            "media_type": "image/png",
            "caption": "the shot",
        }
    ]
    history = await client.history(loop)
    assert history.data[-1].files_shared[0].caption == "the shot"
