"""Users, API tokens and browser sessions. Secrets are stored only as hashes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from core.advisory import clustered
from core.errors import EngineError
from core.ids import aware, utcnow
from core.storage import Database
from core.tables import tokens, users, web_sessions

TOKEN_PATTERN = re.compile(r"la_[0-9a-f]{48}")
USER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
SESSION_LIFETIME = timedelta(days=14)
# `last_used_at` is written at most this often per token, so reads stay reads.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# A token found valid is trusted this long before it is looked up again, so requests do
# not wait on the database (~1.5 ms each). Revoking through this server ends the trust at
# once; revoking from another process (`loopbridge tokens revoke`) within this time.
TOKEN_TRUST_SECONDS = 2.0
# On PostgreSQL the other processes include the other replicas: a token revoked through
# one is refused by every replica within this time.
CLUSTER_TOKEN_TRUST_SECONDS = 1.0
HASHES_AT_ONCE = 2
TOKEN_BY_HASH = select(tokens.c.id, tokens.c.user_id).where(
    tokens.c.hash == bindparam("hash"), tokens.c.revoked_at.is_(None)
)


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    label: str
    created_at: datetime
    last_used_at: datetime | None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ScryptCost:
    n: int
    r: int
    p: int

    @property
    def maxmem(self) -> int:
        # scrypt needs 128·n·r·p bytes; the standard library refuses more than 32 MB unless told.
        return 2 * 128 * self.n * self.r * self.p


# OWASP's current guidance for scrypt; hashes made at a lower cost are redone at the next login.
PASSWORD_COST = ScryptCost(2**17, 8, 1)
LEGACY_COST = ScryptCost(2**14, 8, 1)  # the stored form `scrypt$salt$digest` used this


def _hash_password(
    password: str, salt: bytes | None = None, cost: ScryptCost = PASSWORD_COST
) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=cost.n, r=cost.r, p=cost.p, maxmem=cost.maxmem
    )
    return f"scrypt${cost.n}:{cost.r}:{cost.p}${salt.hex()}${digest.hex()}"


def _parse(stored: str) -> tuple[ScryptCost, bytes, str] | None:
    parts = stored.split("$")
    try:
        if len(parts) == 3:
            return LEGACY_COST, bytes.fromhex(parts[1]), parts[2]
        if len(parts) == 4:
            n, r, p = (int(value) for value in parts[1].split(":"))
            return ScryptCost(n, r, p), bytes.fromhex(parts[2]), parts[3]
    except ValueError:
        return None
    return None


def _check_password(password: str, stored: str) -> bool:
    parsed = _parse(stored)
    if parsed is None:
        return False
    cost, salt, digest_hex = parsed
    expected = _hash_password(password, salt, cost).rsplit("$", 1)[1]
    return hmac.compare_digest(expected, digest_hex)


def _outdated(stored: str) -> bool:
    parsed = _parse(stored)
    return parsed is not None and parsed[0] != PASSWORD_COST


# Checked when the name is unknown or has no password, so that such a login costs the same
# scrypt work as a real one and its timing tells nothing.
_DUMMY_HASH = (
    f"scrypt${PASSWORD_COST.n}:{PASSWORD_COST.r}:{PASSWORD_COST.p}"
    f"${secrets.token_hex(16)}${secrets.token_hex(64)}"
)


@dataclass(frozen=True)
class _Trusted:
    token_id: str
    user: str
    until: float  # time.monotonic()


class Accounts:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._last_used: dict[str, datetime] = {}
        self._trusted: dict[str, _Trusted] = {}  # by token hash
        trust = CLUSTER_TOKEN_TRUST_SECONDS if clustered(db.engine) else TOKEN_TRUST_SECONDS
        self._trust_seconds = trust
        # Each scrypt takes 128 MB for a moment: a burst of logins waits here, not in memory.
        self._hashing = asyncio.Semaphore(HASHES_AT_ONCE)

    async def add_user(self, name: str, password: str | None = None) -> None:
        if not USER_PATTERN.fullmatch(name):
            raise EngineError("invalid_user_name", "a user name is 1-64 letters, digits, . _ @ -")
        password_hash = await self._hash(password) if password else None
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    insert(users).values(id=name, password_hash=password_hash, created_at=utcnow())
                )
        except IntegrityError:
            raise EngineError("user_exists", f"user {name} already exists") from None

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(_hash_password, password)

    async def set_password(self, name: str, password: str) -> None:
        password_hash = await self._hash(password)
        async with self.db.write() as conn:
            await conn.execute(
                update(users).where(users.c.id == name).values(password_hash=password_hash)
            )

    async def user_exists(self, name: str) -> bool:
        async with self.db.engine.connect() as conn:
            row = await conn.execute(select(users.c.id).where(users.c.id == name))
            return row.first() is not None

    async def ensure_user(self, name: str) -> None:
        if not await self.user_exists(name):
            try:
                await self.add_user(name)
            except EngineError as exc:
                if exc.code != "user_exists":
                    raise

    async def check_password(self, name: str, password: str) -> bool:
        """Whether the password is right; a hash of an older cost is redone when it is."""
        async with self.db.engine.connect() as conn:
            row = (
                await conn.execute(select(users.c.password_hash).where(users.c.id == name))
            ).first()
        stored = row.password_hash if row is not None else None
        async with self._hashing:
            right = await asyncio.to_thread(_check_password, password, stored or _DUMMY_HASH)
        if not right or stored is None:
            return False
        if _outdated(stored):
            await self.set_password(name, password)
        return True

    # ---- API tokens ------------------------------------------------------------------

    async def create_token(self, user: str, label: str = "") -> tuple[TokenInfo, str]:
        token = "la_" + secrets.token_hex(24)
        info = TokenInfo("tok_" + secrets.token_hex(6), label, utcnow(), None)
        async with self.db.write() as conn:
            await conn.execute(
                insert(tokens).values(
                    id=info.token_id,
                    user_id=user,
                    hash=sha256(token),
                    label=label,
                    created_at=info.created_at,
                )
            )
        return info, token

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        query = (
            select(tokens)
            .where(tokens.c.user_id == user, tokens.c.revoked_at.is_(None))
            .order_by(tokens.c.created_at)
        )
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [TokenInfo(r.id, r.label, r.created_at, r.last_used_at) for r in rows]

    async def revoke_token(self, token_id: str, user: str | None = None) -> bool:
        query = update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
        if user is not None:
            query = query.where(tokens.c.user_id == user)
        async with self.db.write() as conn:
            result = await conn.execute(query.values(revoked_at=utcnow()))
        self._trusted = {k: v for k, v in self._trusted.items() if v.token_id != token_id}
        return result.rowcount > 0

    async def user_for_token(self, token: str) -> str | None:
        if not TOKEN_PATTERN.fullmatch(token):
            return None
        digest = sha256(token)
        trusted = self._trusted.get(digest)
        if trusted is not None and trusted.until > time.monotonic():
            return trusted.user
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(TOKEN_BY_HASH, {"hash": digest})).first()
        if row is None:
            self._trusted.pop(digest, None)
            return None
        until = time.monotonic() + self._trust_seconds
        self._trusted[digest] = _Trusted(row.id, row.user_id, until)
        await self._touch(row.id)
        return str(row.user_id)

    async def _touch(self, token_id: str) -> None:
        now = utcnow()
        if (
            now - self._last_used.get(token_id, datetime.min.replace(tzinfo=now.tzinfo))
            < LAST_USED_RESOLUTION
        ):
            return
        self._last_used[token_id] = now
        async with self.db.write() as conn:
            await conn.execute(
                update(tokens).where(tokens.c.id == token_id).values(last_used_at=now)
            )

    # ---- browser sessions ---------------------------------------------------------------

    async def create_session(self, user: str) -> str:
        secret = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(
                insert(web_sessions).values(
                    hash=sha256(secret),
                    user_id=user,
                    created_at=now,
                    expires_at=now + SESSION_LIFETIME,
                )
            )
        return secret

    async def user_for_session(self, secret: str) -> str | None:
        query = select(web_sessions.c.user_id, web_sessions.c.expires_at).where(
            web_sessions.c.hash == sha256(secret)
        )
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return row.user_id if aware(row.expires_at) > utcnow() else None

    async def end_session(self, secret: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(delete(web_sessions).where(web_sessions.c.hash == sha256(secret)))
