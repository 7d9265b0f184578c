"""Several real `loopbridge serve` processes ("replicas") on one PostgreSQL database and one
data directory, for tests and the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]


@dataclass
class Replica:
    name: str
    process: asyncio.subprocess.Process
    url: str  # http://127.0.0.1:PORT
    http: httpx.AsyncClient
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Cluster:
    home: Path
    database_url: str
    replicas: dict[str, Replica] = field(default_factory=dict)
    token: str = ""

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "LOOPBRIDGE_HOME": str(self.home),
            "LOOPBRIDGE_DATABASE_URL": self.database_url,
            "LOOPBRIDGE_SANDBOX": "local",
            **extra,
        }

    async def create_token(self, user: str = "alice") -> str:
        process = await asyncio.create_subprocess_exec(
            *LOOPBRIDGE, "tokens", "create", "--user", user, env=self.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        self.token = out.decode().split()[-1]
        return self.token

    async def start(self, *names: str) -> list[Replica]:
        """Start these replicas at once; each is ready when it says it serves."""
        return list(await asyncio.gather(*(self._start(name) for name in names)))

    async def _start(self, name: str) -> Replica:
        log = open(self.home.parent / f"replica-{name}.log", "ab")  # noqa: ASYNC230, SIM115 - the child's
        try:
            process = await asyncio.create_subprocess_exec(
                *LOOPBRIDGE, "serve", "--port", "0",
                env=self.env(LOOPBRIDGE_REPLICA_ID=name),
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        url = await _serving_url(process)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        http = httpx.AsyncClient(base_url=url + "/api/v1", headers=headers, timeout=60)
        replica = Replica(name, process, url, http)
        replica.drain = asyncio.create_task(_drain(process))
        self.replicas[name] = replica
        return replica

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    async def kill(self, name: str) -> None:
        """kill -9: no clean-up of any kind."""
        replica = self.replicas.pop(name)
        replica.process.send_signal(signal.SIGKILL)
        await replica.process.wait()
        await replica.http.aclose()

    async def stop(self) -> None:
        for replica in self.replicas.values():
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas.values():
            try:
                await asyncio.wait_for(replica.process.wait(), 20)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()
            await replica.http.aclose()
        self.replicas.clear()


async def _serving_url(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        assert line, "the replica ended before serving (see its replica-*.log)"
        if found := re.search(r"(http://\S+)/api/v1", line):
            return found.group(1)


async def _drain(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while await process.stdout.read(65536):
        pass


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory lies in `directory` (a loop's agent and its children)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(int(proc.name))
    return found
