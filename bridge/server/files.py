"""Files [ext]: list, download and upload a loop's working directory, streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from bridge.contract.models import FileList, FileWritten
from bridge.server.app import API_PREFIX, LOOP, Owner
from bridge.server.limits import JSONRoute
from bridge.server.openapi import error_responses
from core import files
from core.engine import Engine
from core.errors import EngineError

# Bytes gathered before each write: fewer trips to the writing thread than the
# server's small receive chunks, and still a fixed, small amount of memory.
WRITE_BUFFER = 1024 * 1024

DOWNLOAD_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the file's bytes",
        # Typed by the file's name (image/png, text/csv…).
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}
# A path holding a line break matches no route (Starlette's path pattern stops there).
NO_ROUTE = "not_found"
UPLOAD_BODY = {
    "requestBody": {
        # An empty body writes an empty file: HTTP cannot tell it from a missing body.
        "required": False,
        "description": f"the file's bytes (at most {files.UPLOAD_LIMIT} bytes)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def file_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["files"], route_class=JSONRoute)

    @router.get(
        "/loops/{loop_id}/files",
        response_model=FileList,
        responses=error_responses(
            *LOOP, "invalid_request", "invalid_path", "not_a_directory", "file_not_found"
        ),
        summary="List one directory of the loop's working directory",
    )
    async def list_files(loop_id: str, user: Owner, path: Annotated[str, Query()] = "") -> Any:
        """Not recursive; `.git` is never listed; `size` is null for a directory. Errors:
        400 `invalid_path`, `not_a_directory`; 404 `file_not_found`."""
        workdir = await engine.workdir(user, loop_id)
        entries = await asyncio.to_thread(files.list_dir, workdir, path)
        return {"data": [asdict(entry) for entry in entries]}

    @router.get(
        "/loops/{loop_id}/files/{path:path}",
        response_class=Response,
        responses={
            **DOWNLOAD_RESPONSE,
            **error_responses(*LOOP, "invalid_path", "not_a_file", "file_not_found", NO_ROUTE),
        },
        summary="Download one file",
    )
    async def download_file(loop_id: str, path: str, user: Owner) -> Response:
        """The bytes, streamed, with `Content-Type` and `Content-Length`. Errors: 400
        `invalid_path`, `not_a_file`; 404 `file_not_found`."""
        workdir = await engine.workdir(user, loop_id)
        opened = await asyncio.to_thread(files.open_file, workdir, path)
        name = opened.path.rsplit("/", 1)[-1]
        headers = {
            "Content-Length": str(opened.size),
            # Agent-written bytes are never run as a page of this origin.
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
            "Cache-Control": "no-store",
        }
        return StreamingResponse(_chunks(opened), media_type=opened.media_type, headers=headers)

    @router.put(
        "/loops/{loop_id}/files/{path:path}",
        status_code=201,
        response_model=FileWritten,
        # 500 sandbox_spawn_failed: a repo loop's first write clones it, and that failed.
        responses=error_responses(
            *LOOP,
            "invalid_path",
            "file_too_large",
            "not_a_file",
            "not_a_directory",
            "loop_archived",
            "sandbox_spawn_failed",
            "csrf_failed",
            NO_ROUTE,
        ),
        openapi_extra=UPLOAD_BODY,
        summary="Write one file (the raw request body)",
    )
    async def upload_file(loop_id: str, path: str, request: Request, user: Owner) -> Any:
        """Parents are made; an existing file is replaced at once when the body is complete.
        Errors: 400 `invalid_path`, `file_too_large` (over 25 MiB), `not_a_file`,
        `not_a_directory`, `loop_archived`; 500 `sandbox_spawn_failed` (a repo loop's
        first write clones it)."""
        workdir = await engine.workdir(user, loop_id, write=True)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > files.UPLOAD_LIMIT:
            raise _too_large()
        upload = await asyncio.to_thread(files.Upload, workdir, path)
        try:
            buffer = bytearray()
            async for chunk in request.stream():
                if upload.size + len(buffer) + len(chunk) > files.UPLOAD_LIMIT:
                    raise _too_large()
                buffer += chunk
                if len(buffer) >= WRITE_BUFFER:
                    await asyncio.to_thread(upload.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(upload.write, bytes(buffer))
            await asyncio.to_thread(upload.commit)
        except BaseException:
            await asyncio.to_thread(upload.abort)
            raise
        return FileWritten(path=upload.path, size=upload.size)

    return router


def _too_large() -> EngineError:
    return EngineError("file_too_large", f"the file is over {files.UPLOAD_LIMIT} bytes (25 MiB)")


async def _chunks(opened: files.OpenFile) -> AsyncIterator[bytes]:
    """The file's bytes, as many as it had when opened (it may grow while it is sent)."""
    left = opened.size
    try:
        while left > 0:
            chunk = await asyncio.to_thread(opened.read, min(files.READ_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
    finally:
        opened.close()
