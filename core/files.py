"""A loop's working directory as files: safe paths, listing, streamed reads and writes.

Every path comes from someone hostile (an API caller or the model), and the agent
can change the directory while we look at it. So a path is checked in two steps:
its text (relative, no `..`, no NUL), then where it resolves (through symlinks,
under the working directory). The file is then opened by walking the resolved
path one component at a time with `O_NOFOLLOW`, from a descriptor of the
working directory: a directory swapped for a symlink after the check makes the
walk fail instead of leading outside. Writes never go through a symlink at all.

The functions here block (file system calls): callers run them in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import mimetypes
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import EngineError

NAME_LIMIT = 255  # bytes of one path component, as the file system allows
PATH_LIMIT = 4096
UPLOAD_LIMIT = 25 * 1024 * 1024
IMAGE_LIMIT = 5 * 1024 * 1024
READ_CHUNK = 256 * 1024
HIDDEN = frozenset({".git"})
_DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What an image's first bytes say it is; the model API takes these four kinds.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True)
class Entry:
    path: str
    type: str  # file | dir
    size: int | None  # None for a directory
    modified_at: datetime


def invalid(path: str, why: str) -> EngineError:
    return EngineError("invalid_path", f"{path!r} {why}")


def clean(path: str, *, root_ok: bool = False) -> PurePosixPath:
    """The path's text made safe: relative, `/`-separated, no `..`, no NUL."""
    if "\x00" in path:
        raise invalid(path.replace("\x00", "\\0"), "holds a NUL")
    if path.startswith("/"):
        raise invalid(path, "is absolute: paths are relative to the working directory")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise invalid(path, "holds '..'")
    if len(path.encode(errors="surrogateescape")) > PATH_LIMIT or any(
        len(part.encode(errors="surrogateescape")) > NAME_LIMIT for part in parts
    ):
        raise invalid(path[:100], "is too long")
    if not parts and not root_ok:
        raise invalid(path, "names no file")
    return PurePosixPath(*parts)


def _resolved(root: Path, rel: PurePosixPath, path: str) -> PurePosixPath:
    """Where `rel` leads once its symlinks are followed, relative to the real root."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, *rel.parts))
    if target != real_root and not target.startswith(real_root + os.sep):
        raise invalid(path, "leads outside the working directory")
    return PurePosixPath(os.path.relpath(target, real_root))


def _open_root(root: Path) -> int:
    try:
        return os.open(root, _DIR_FLAGS | os.O_RDONLY)
    except FileNotFoundError:
        raise EngineError("file_not_found", "the working directory does not exist yet") from None


@contextlib.contextmanager
def _walk(root: Path, parts: tuple[str, ...], path: str) -> Iterator[int]:
    """A descriptor of the directory `parts` names under `root`, reached without symlinks."""
    fd = _open_root(root)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS | os.O_RDONLY, dir_fd=fd)
            except FileNotFoundError:
                raise EngineError("file_not_found", f"no such file: {path}") from None
            except NotADirectoryError:
                message = f"{path}: a parent is not a directory"
                raise EngineError("not_a_directory", message) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # swapped for a symlink since the check
                    raise invalid(path, "changed while it was opened") from None
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _open_target(root: Path, path: str, flags: int, *, root_ok: bool = False) -> tuple[int, str]:
    """Open what `path` names (following symlinks that stay inside); the fd and its
    path relative to the working directory."""
    rel = _resolved(root, clean(path, root_ok=root_ok), path)
    parts = () if rel == PurePosixPath(".") else rel.parts
    if not parts:
        return _open_root(root), "."
    with _walk(root, parts[:-1], path) as parent:
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            raise EngineError("file_not_found", f"no such file: {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise invalid(path, "changed while it was opened") from None
            if exc.errno == errno.ENOTDIR:
                raise EngineError("not_a_directory", f"{path} is not a directory") from None
            raise
    return fd, str(rel)


# ---- reading --------------------------------------------------------------------------


def list_dir(root: Path, path: str = "") -> list[Entry]:
    """One directory's entries (not recursive, `.git` left out), by name."""
    if not root.is_dir() and clean(path, root_ok=True) == PurePosixPath("."):
        return []  # no turn has made the working directory yet: it is empty
    fd, rel = _open_target(root, path, os.O_RDONLY | os.O_DIRECTORY, root_ok=True)
    real_root = os.path.realpath(root)
    try:
        entries = []
        for name in sorted(os.listdir(fd)):
            if name in HIDDEN:
                continue
            info = _entry_stat(fd, name, real_root)
            if info is None:
                continue
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
            entries.append(
                Entry(
                    path=name if rel == "." else f"{rel}/{name}",
                    type=kind,
                    size=info.st_size if kind == "file" else None,
                    modified_at=datetime.fromtimestamp(info.st_mtime, UTC),
                )
            )
        return entries
    finally:
        os.close(fd)


def _entry_stat(dir_fd: int, name: str, real_root: str) -> os.stat_result | None:
    """An entry's stat; a symlink shows as what it points to, only when that stays inside.
    Anything else (sockets, links leading out or nowhere) is not listed."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            target = os.path.realpath(f"/proc/self/fd/{dir_fd}/{name}")
            if not target.startswith(real_root + os.sep):
                return None
            info = os.stat(target, follow_symlinks=False)
    except OSError:
        return None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        return None
    return info


@dataclass
class OpenFile:
    """A regular file opened for reading: its descriptor, size and media type."""

    fd: int
    path: str
    size: int
    media_type: str
    head: bytes  # the first bytes, which say whether it is an image

    def read(self, size: int = READ_CHUNK) -> bytes:
        return os.read(self.fd, size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_file(root: Path, path: str) -> OpenFile:
    # O_NONBLOCK: a FIFO the agent made must not hold the opening thread forever.
    fd, rel = _open_target(root, path, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise EngineError("not_a_file", f"{path} is a directory")
        raise EngineError("file_not_found", f"{path} is not a regular file")
    head = os.pread(fd, 16, 0)
    return OpenFile(fd, rel, info.st_size, media_type(rel, head), head)


def media_type(path: str, head: bytes = b"") -> str:
    """An image's type from its first bytes; anything else from its name."""
    return image_type(head) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def image_type(head: bytes) -> str | None:
    """The media type of an image the model can see (png, jpeg, gif, webp), or None."""
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


# ---- writing --------------------------------------------------------------------------


class Upload:
    """A file being written: bytes go to a temporary file beside the target, which
    replaces it (atomically) on `commit`. Parents are made as needed; no component
    of the path may be a symlink."""

    def __init__(self, root: Path, path: str, limit: int = UPLOAD_LIMIT) -> None:
        rel = clean(path)
        if _resolved(root, rel, path) != rel:
            raise invalid(path, "goes through a symlink: files are written only to real paths")
        self.path = str(rel)
        self.name = rel.parts[-1]
        self.limit = limit
        self.size = 0
        root_fd = _open_root(root)
        owner = os.fstat(root_fd)
        # The agent may run as another uid (Podman): its files must stay its own.
        self._owner = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None
        try:
            self._dir = self._make_parents(root_fd, rel.parts[:-1], path)
        finally:
            os.close(root_fd)
        try:
            info = os.stat(self.name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode):
            os.close(self._dir)
            raise EngineError("not_a_file", f"{path} is a directory")
        self._temp = f".upload-{secrets.token_hex(8)}.part"
        self._fd = os.open(
            self._temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=self._dir,
        )
        if self._owner is not None:
            os.fchown(self._fd, *self._owner)

    def _make_parents(self, fd: int, parts: tuple[str, ...], path: str) -> int:
        current = os.dup(fd)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o755, dir_fd=current)
                    if self._owner is not None:
                        os.chown(part, *self._owner, dir_fd=current, follow_symlinks=False)
                except FileExistsError:
                    pass
                try:
                    nxt = os.open(part, _DIR_FLAGS | os.O_RDONLY, dir_fd=current)
                except NotADirectoryError:
                    raise EngineError(
                        "not_a_directory", f"{path}: a parent is not a directory"
                    ) from None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise invalid(path, "changed while it was written") from None
                    raise
                os.close(current)
                current = nxt
        except BaseException:
            os.close(current)
            raise
        return current

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise EngineError("file_too_large", f"the file is over {self.limit} bytes")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def commit(self) -> None:
        os.close(self._fd)
        self._fd = -1
        try:
            os.rename(self._temp, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except IsADirectoryError:
            self.abort()
            raise EngineError("not_a_file", f"{self.path} is a directory") from None
        finally:
            if self._dir >= 0:
                os.close(self._dir)
                self._dir = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._temp, dir_fd=self._dir)
            os.close(self._dir)
            self._dir = -1


# ---- attachments -----------------------------------------------------------------------


def check_attachments(root: Path, paths: list[str]) -> list[dict[str, str]]:
    """Each path names a file of the working directory; an image is within IMAGE_LIMIT.
    The attachments as a message records them."""
    checked = []
    for path in paths:
        rel = clean(path)
        try:
            opened = open_file(root, path)
        except EngineError as exc:
            if exc.code == "invalid_path":
                raise
            raise EngineError("attachment_not_found", f"no file {path} to attach") from None
        opened.close()
        if image_type(opened.head) is not None and opened.size > IMAGE_LIMIT:
            raise EngineError(
                "attachment_too_large", f"{path} is an image over {IMAGE_LIMIT} bytes"
            )
        checked.append({"path": str(rel)})
    return checked


def prompt_content(
    root: Path, text: str, attachments: list[dict[str, str]]
) -> str | list[dict[str, Any]]:
    """A message as the model gets it: the text naming every attachment, then the images
    as image blocks. Read when the turn starts, so a file changed since the message was
    sent is read as it is now."""
    if not attachments:
        return text
    notes, images = [], []
    for attachment in attachments:
        path = attachment["path"]
        try:
            opened = open_file(root, path)
        except EngineError as exc:
            notes.append(f"- {path} (could not be read: {exc.message})")
            continue
        try:
            kind = image_type(opened.head)
            if kind is not None and opened.size <= IMAGE_LIMIT:
                data = os.pread(opened.fd, IMAGE_LIMIT + 1, 0)
                source = {"type": "base64", "media_type": kind, "data": _b64(data)}
                images.append({"type": "image", "source": source})
                notes.append(f"- {path} (image, shown below)")
            else:
                notes.append(f"- {path} ({opened.size} bytes)")
        finally:
            opened.close()
    listing = "\n".join(notes)
    note = f"Attached files, in the working directory:\n{listing}"
    return [{"type": "text", "text": f"{text}\n\n{note}"}, *images]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- the agent's paths ------------------------------------------------------------------


def agent_relative(path: str, *insides: str) -> str:
    """A path the agent wrote (relative to its working directory, or absolute under one
    of the names that directory has for it) as a path relative to it."""
    if path.startswith("/"):
        for inside in insides:
            base = inside.rstrip("/")
            if path == base:
                return ""
            if path.startswith(base + "/"):
                return path[len(base) + 1 :]
        raise invalid(path, "is outside the working directory")
    return path
