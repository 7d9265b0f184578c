"""Whether a database URL can work here, said as one line that names the fix.

The engine speaks SQLAlchemy's asyncio API, so only async drivers work: aiosqlite
for SQLite, asyncpg for PostgreSQL. URLs written for other tools (`sqlite:///…`,
`postgresql://…`) parse fine and fail later with a driver error; this names the
URL to write instead, before anything connects.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sqlalchemy import make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from core.errors import SettingsError

SETTING = "LOOPBRIDGE_DATABASE_URL"
POSTGRES_EXTRA = "pip install 'loopbridge[postgres]'"


def check_database_url(url: str) -> URL:
    """The parsed URL, or SettingsError saying what to write instead."""
    try:
        parts = make_url(url)
    except ArgumentError:
        raise SettingsError(
            f"{SETTING} is not a database URL: use sqlite+aiosqlite:////path/to/loopbridge.db "
            "or postgresql+asyncpg://user:password@host/database"
        ) from None
    backend, driver = parts.get_backend_name(), parts.get_driver_name()
    shown = parts.render_as_string(hide_password=True)
    if backend == "sqlite":
        if driver != "aiosqlite":
            raise SettingsError(
                f"{SETTING}={shown} uses the {driver} driver, which is not async: "
                f"write sqlite+aiosqlite:///{parts.database or '/path/to/loopbridge.db'}"
            )
        _check_sqlite_file(parts.database, shown)
    elif backend == "postgresql":
        if driver != "asyncpg":
            fixed = parts.set(drivername="postgresql+asyncpg").render_as_string(hide_password=True)
            raise SettingsError(
                f"{SETTING}={shown} uses the {driver} driver, which is not async: write "
                f"{fixed} ({POSTGRES_EXTRA})"
            )
        if importlib.util.find_spec("asyncpg") is None:
            raise SettingsError(f"{SETTING} needs the asyncpg driver: {POSTGRES_EXTRA}")
    elif backend in ("mysql", "mariadb"):
        raise SettingsError(
            f"{SETTING}: MySQL and MariaDB are not supported; use SQLite (the default) or "
            f"PostgreSQL (postgresql+asyncpg://…, {POSTGRES_EXTRA})"
        )
    else:
        raise SettingsError(
            f"{SETTING}: {backend} is not supported; use SQLite (sqlite+aiosqlite:///…) or "
            f"PostgreSQL (postgresql+asyncpg://…)"
        )
    return parts


def _check_sqlite_file(database: str | None, shown: str) -> None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    folder = path.parent
    if path.is_dir():
        raise SettingsError(f"{SETTING}={shown} names a directory, not a database file")
    if not folder.is_dir():
        raise SettingsError(
            f"{SETTING}={shown}: the directory {folder} does not exist (create it first)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SettingsError(f"{SETTING}={shown}: the directory {folder} is not writable")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SettingsError(f"{SETTING}={shown}: the file {path} is not readable and writable")
