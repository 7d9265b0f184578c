"""View links: a signed, read-only, expiring grant to one loop's page.

A grant is `v1.<payload>.<signature>`: the payload (base64url JSON) names the
loop, its owner and when the grant ends; the signature is an HMAC-SHA256 of
`v1.<payload>` with the server's signing key. The key is 32 random bytes in
the data directory (`view-links.key`, mode 0600), made at first use and shared
by every replica through that directory. `loopbridge keys rotate` replaces it,
which ends every link made before; a server notices within a second.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.ids import loop_id as full_loop_id

KEY_FILE = "view-links.key"
VERSION = "v1"
GRANT_LIMIT = 1024
# How long a server trusts the key it read before it looks at the file again.
KEY_RECHECK_SECONDS = 1.0


class GrantError(Exception):
    """The grant cannot be used; the message says why, in words for a person."""


@dataclass(frozen=True)
class Grant:
    loop_id: str
    owner: str
    expires_at: datetime


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def rotate_key(data_dir: Path) -> Path:
    """A new signing key, written whole before it replaces the old one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = key_path(data_dir)
    fresh = path.with_name(f".{KEY_FILE}.{secrets.token_hex(4)}")
    _write_secret(fresh, os.O_EXCL)
    os.replace(fresh, path)
    return path


def _write_secret(path: Path, exclusive: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | exclusive, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")


class Keyring:
    """The signing key of one data directory, made when first needed."""

    def __init__(self, data_dir: Path) -> None:
        self.path = key_path(data_dir)
        self._key: bytes | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = -KEY_RECHECK_SECONDS

    def key(self) -> bytes:
        # A stat at most once a second (a few µs): rotation by another process is seen
        # without reading the file on every request.
        now = time.monotonic()
        if self._key is not None and now - self._checked < KEY_RECHECK_SECONDS:
            return self._key
        self._checked = now
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another replica made it first
                _write_secret(self.path, os.O_EXCL)
            stat = self.path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if stamp != self._stamp or self._key is None:
            self._key = bytes.fromhex(self.path.read_text().strip())
            self._stamp = stamp
        return self._key

    def mint(self, loop_id: str, owner: str, expires_at: datetime) -> str:
        claims = {"l": loop_id, "u": owner, "e": int(expires_at.timestamp())}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{VERSION}.{payload}.{self._sign(payload)}"

    def verify(self, grant: str, loop_id: str) -> Grant:
        """The grant's claims, when it is this server's, unexpired, and for `loop_id`."""
        version, _, rest = grant.partition(".")
        payload, _, signature = rest.partition(".")
        if (
            len(grant) > GRANT_LIMIT
            or not grant.isascii()
            or version != VERSION
            or not payload
            or not signature
        ):
            raise GrantError("This link is not a loopbridge view link.")
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise GrantError("This link is not valid: it was changed, or it has been revoked.")
        try:
            claims = json.loads(_unb64(payload))
            granted = Grant(
                str(claims["l"]), str(claims["u"]), datetime.fromtimestamp(claims["e"], UTC)
            )
        except (ValueError, KeyError, TypeError, OverflowError, OSError, binascii.Error):
            raise GrantError("This link is not a loopbridge view link.") from None
        if granted.loop_id != full_loop_id(loop_id):
            raise GrantError("This link is for another loop.")
        if granted.expires_at.timestamp() <= time.time():
            raise GrantError("This link has expired. Ask for a new one in the thread.")
        return granted

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self.key(), f"{VERSION}.{payload}".encode(), hashlib.sha256).digest()
        return _b64(digest)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
