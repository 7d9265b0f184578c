"""Files between a chat thread and a loop.

In: each file attached to a person's message is downloaded from the platform and
uploaded to the loop under `uploads/`, streamed (never whole in memory), then sent
with the message as an attachment, so an image reaches the model as an image. A file
the loop cannot take (over the API's 25 MiB, or one the platform will not hand out)
is named in the thread. An image over the 5 MB the model takes is uploaded and named
to the agent by its path instead.

Out: each `file_shared` of a turn is downloaded from the loop and posted to the
thread with its caption; one over the platform's limit gets a note that says how to
fetch it through the API instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from adapters.chat_thread import ChatThread, DownloadFailed, IncomingFile, tell
from bridge.client import LoopApiError, LoopClient
from bridge.contract.events import FileSharedEvent

log = logging.getLogger(__name__)

UPLOAD_LIMIT = 25 * 1024 * 1024  # the Files API's `PUT /files` limit
IMAGE_LIMIT = 5 * 1024 * 1024  # an attached image the model takes
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})
UPLOADS = "uploads"
NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
NAME_LIMIT = 120
MiB = 1024 * 1024


def megabytes(size: int) -> str:
    return f"{size / MiB:.1f} MB"


def safe_name(name: str) -> str:
    """A file name that is one plain path segment."""
    base = NAME_CHARS.sub("_", posixpath.basename(name.replace("\\", "/"))).strip("._")
    stem, dot, suffix = base.rpartition(".")
    if len(base) > NAME_LIMIT:
        base = (stem[: NAME_LIMIT - len(suffix) - 1] + dot + suffix) if dot else base[:NAME_LIMIT]
    return base or "file"


@dataclass
class FilesIn:
    """What became of a message's files."""

    attachments: list[str] = field(default_factory=list)
    # Uploaded, but named to the agent rather than attached (an image over 5 MB).
    named: list[str] = field(default_factory=list)
    # Said in the thread: what was not sent, and why.
    notes: list[str] = field(default_factory=list)

    def content(self, text: str) -> str:
        """The message's text, with the files that are only named."""
        if not text.strip():
            text = "(files attached)" if self.attachments or self.named else text
        if not self.named:
            return text
        listed = ", ".join(self.named)
        return f"{text}\n\n(Also uploaded, too large to attach as images: {listed})"


async def bring_in(
    client: LoopClient, loop_id: str, files: tuple[IncomingFile, ...], thread: ChatThread
) -> FilesIn:
    result = FilesIn()
    taken: set[str] = set()
    for file in files:
        name = safe_name(file.name)
        while name in taken:
            name = "1-" + name
        taken.add(name)
        path = f"{UPLOADS}/{name}"
        if file.url is None:
            result.notes.append(f"`{file.name}` was not sent: it cannot be downloaded here.")
            continue
        if file.size is not None and file.size > UPLOAD_LIMIT:
            result.notes.append(
                f"`{file.name}` ({megabytes(file.size)}) was not sent: a loop takes files "
                f"up to {megabytes(UPLOAD_LIMIT)}."
            )
            continue
        try:
            async with thread.download(file) as chunks:
                written = await client.upload_file(loop_id, path, _capped(chunks, UPLOAD_LIMIT))
        except _TooLarge:
            result.notes.append(
                f"`{file.name}` was not sent: it is over the {megabytes(UPLOAD_LIMIT)} "
                "a loop takes."
            )
            continue
        except (DownloadFailed, LoopApiError, httpx.HTTPError) as exc:
            log.warning("could not bring %s into loop %s: %s", file.name, loop_id, exc)
            result.notes.append(f"`{file.name}` was not sent: {_reason(exc)}")
            continue
        if _image(file, name) and written.size > IMAGE_LIMIT:
            result.named.append(path)
            result.notes.append(
                f"`{file.name}` is over the {megabytes(IMAGE_LIMIT)} the model takes as an "
                f"image: the agent gets it as the file `{path}`."
            )
        else:
            result.attachments.append(path)
    return result


def _image(file: IncomingFile, name: str) -> bool:
    suffix = posixpath.splitext(name)[1].lower()
    return file.media_type in IMAGE_TYPES or suffix in IMAGE_SUFFIXES


def _reason(exc: Exception) -> str:
    if isinstance(exc, LoopApiError):
        return exc.message
    return str(exc) or type(exc).__name__


class _TooLarge(Exception):
    pass


async def _capped(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge
        yield chunk


# ---- downloads from a platform -------------------------------------------------------


@contextlib.asynccontextmanager
async def fetch(
    http: httpx.AsyncClient,
    url: str,
    *,
    hosts: frozenset[str],
    headers: Mapping[str, str] | None = None,
    expect_html: bool = False,
) -> AsyncIterator[AsyncIterator[bytes]]:
    """Stream a platform's file. Only `hosts` are asked (the platform's own: a message
    is hostile and may name any URL), and `headers` (a bot token) go nowhere else.
    A page of HTML where a file was expected is a sign-in page, not the file."""
    host = (urlsplit(url).hostname or "").lower()
    if urlsplit(url).scheme not in ("http", "https") or not _host_allowed(host, hosts):
        raise DownloadFailed("it is not on the platform's file host")
    try:
        async with http.stream("GET", url, headers=dict(headers or {})) as response:
            if response.status_code != 200:
                raise DownloadFailed(f"the platform answered {response.status_code}")
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            if kind == "text/html" and not expect_html:
                raise DownloadFailed("the platform did not hand it out (no access)")
            yield response.aiter_bytes()
    except httpx.HTTPError as exc:
        raise DownloadFailed(f"cannot download it: {exc}") from None


def _host_allowed(host: str, hosts: frozenset[str]) -> bool:
    return any(host == allowed or host.endswith("." + allowed) for allowed in hosts)


# ---- files the agent shares ----------------------------------------------------------


class SharedFiles:
    """Posts a turn's `file_shared` events to its thread, in the background of the turn."""

    def __init__(self, client: LoopClient, loop_id: str, thread: ChatThread) -> None:
        self.client = client
        self.loop_id = loop_id
        self.thread = thread
        self._tasks: list[asyncio.Task[None]] = []

    def shared(self, data: FileSharedEvent) -> None:
        self._tasks.append(asyncio.create_task(self._post(data)))

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _post(self, data: FileSharedEvent) -> None:
        path, size, caption = data.path, data.size, data.caption or ""
        name = posixpath.basename(path) or "file"
        limit = self.thread.file_limit
        try:
            if size > limit:
                await self._say_too_large(path, size, limit)
                return
            async with self.client.download_file(self.loop_id, path) as download:
                content = await _read_capped(download.chunks, limit)
            if content is None:
                await self._say_too_large(path, size, limit)
                return
            await self.thread.post_file(name, content, caption)
        except Exception as exc:  # the note is the fallback; never lose the turn over it
            log.warning("could not post %s of loop %s: %s", path, self.loop_id, exc)
            await tell(
                self.thread,
                f"The agent shared `{path}`, but posting it failed ({_reason(exc)}). "
                + self._how_to_get(path),
            )

    async def _say_too_large(self, path: str, size: int, limit: int) -> None:
        await tell(
            self.thread,
            f"The agent shared `{path}` ({megabytes(size)}), too large to post here "
            f"(at most {megabytes(limit)}). " + self._how_to_get(path),
        )

    def _how_to_get(self, path: str) -> str:
        return f"Get it through the Loop API: `GET /api/v1/loops/{self.loop_id}/files/{path}`."


async def _read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    parts: list[bytes] = []
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
