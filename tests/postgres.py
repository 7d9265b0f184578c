"""A throwaway PostgreSQL server for tests, from the machine's own PostgreSQL binaries."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from bridge.server.net import listen


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def unavailable() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if binaries() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as another user"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install 'loopbridge[postgres]')"
    return None


class Postgres:
    """initdb + pg_ctl in a temporary directory, trust auth on 127.0.0.1 only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        probe = listen("127.0.0.1", 0)
        self.port = probe.getsockname()[1]
        probe.close()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(binaries() / tool), *args]  # type: ignore[operator]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "log"),
            "start",
        )
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "loopbridge"
        )
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/loopbridge"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
