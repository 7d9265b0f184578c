"""The sandbox interface: a backend gives each loop a place to run its agent."""

from __future__ import annotations

import abc
import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import EngineError


@dataclass(frozen=True)
class SandboxSpec:
    """What a backend needs to know to prepare a loop's sandbox."""

    loop_id: str
    env: dict[str, str]
    repo_url: str | None = None


@dataclass(frozen=True)
class AgentHost:
    """How to start a loop's agent CLI: the SDK spawns `cli_path` in `cwd` with `env`.

    `workdir` is the host path of the loop's working directory (what the agent
    sees as `cwd`, which may be another path inside a container).
    """

    cli_path: str
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = Path()


class Sandbox(abc.ABC):
    """One backend; each loop gets its own working directory and home under `data_dir`."""

    name: str = "abstract"

    def __init__(self, data_dir: Path, cli_path: Path) -> None:
        self.data_dir = data_dir
        self.cli_path = cli_path

    def loop_dir(self, loop_id: str) -> Path:
        return self.data_dir / "loops" / loop_id

    def workdir(self, loop_id: str) -> Path:
        return self.loop_dir(loop_id) / "work"

    def home(self, loop_id: str) -> Path:
        return self.loop_dir(loop_id) / "home"

    async def start(self) -> None:
        """Called once when the server starts (check the backend, adopt leftovers)."""

    async def close(self) -> None:
        """Called once when the server stops."""

    @abc.abstractmethod
    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        """Make the loop's sandbox ready; the flag is True when it had to be started."""

    async def release(self, loop_id: str) -> None:
        """The loop went idle: free what can be started again later."""

    async def remove(self, loop_id: str) -> None:
        """The loop was archived: stop everything, keep the files."""
        await self.release(loop_id)

    async def prepare_dirs(self, spec: SandboxSpec) -> bool:
        """Create the loop's directories (cloning its repo); True when they were new."""
        # The home first: a workdir seeded from the host before the first turn has none yet.
        (self.home(spec.loop_id) / ".claude").mkdir(parents=True, exist_ok=True)
        workdir = self.workdir(spec.loop_id)
        if workdir.exists():
            return False
        if spec.repo_url is None:
            workdir.mkdir(parents=True)
            return True
        await clone(spec.repo_url, workdir)
        return True


async def clone(url: str, dest: Path) -> None:
    git = shutil.which("git")
    if git is None:
        raise EngineError("sandbox_spawn_failed", "git is not installed: cannot clone the repo")
    proc = await asyncio.create_subprocess_exec(
        git,
        "clone",
        "--quiet",
        url,
        str(dest),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["git failed"]
        raise EngineError("sandbox_spawn_failed", f"cannot clone {url}: {detail[0]}")
