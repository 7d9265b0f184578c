"""The sandbox interface: a backend gives each loop a place to run its agent."""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import EngineError

# A clone that takes longer (a dead host, a huge repo) fails the turn instead of holding it.
CLONE_TIMEOUT_SECONDS = 300.0
# git must never wait for a person: no terminal prompt, no ssh question.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}


def write_script(path: Path, text: str, mode: int = 0o755) -> None:
    """Put a launcher in place whole (staged, then renamed): replicas sharing the data
    directory each write it at start while the other's agents may be starting it."""
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(text)
    staged.chmod(mode)
    staged.replace(path)


@dataclass(frozen=True)
class SandboxSpec:
    """What a backend needs to know to prepare a loop's sandbox."""

    loop_id: str
    env: dict[str, str]
    repo_url: str | None = None
    # The repo's configured branch (cloned) and the loop's own (checked out, made when missing).
    repo_branch: str | None = None
    branch: str | None = None


@dataclass(frozen=True)
class AgentHost:
    """How to start a loop's agent CLI: the SDK spawns `cli_path` in `cwd` with `env`.

    `workdir` is the host path of the loop's working directory (what the agent
    sees as `cwd`, which may be another path inside a container); `inside` is
    that other path (None: the agent sees the host path).
    """

    cli_path: str
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = Path()
    inside: str | None = None


class Sandbox(abc.ABC):
    """One backend; each loop gets its own working directory and home under `data_dir`."""

    name: str = "abstract"

    def __init__(self, data_dir: Path, cli_path: Path) -> None:
        self.data_dir = data_dir
        self.cli_path = cli_path
        self._preparing: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

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
        """Create the loop's directories (cloning its repo); True when they were new.

        Also called by the files API before a loop's first turn, so one lock per loop;
        a clone lands beside the workdir and is renamed into place once complete.
        """
        async with self._preparing[spec.loop_id]:
            # The home first: a workdir seeded from the host before the first turn has none yet.
            (self.home(spec.loop_id) / ".claude").mkdir(parents=True, exist_ok=True)
            workdir = self.workdir(spec.loop_id)
            if workdir.exists():
                return False
            if spec.repo_url is None:
                workdir.mkdir(parents=True)
                return True
            partial = workdir.with_name(workdir.name + ".partial")
            await asyncio.to_thread(shutil.rmtree, partial, True)
            try:
                await clone(spec.repo_url, partial, spec.repo_branch, spec.branch)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, partial, True)
                raise
            partial.rename(workdir)
            return True


BRANCH_LIMIT = 200
_BRANCH_FORBIDDEN = set(" ~^:?*[\\\x7f")


def branch_problem(name: str) -> str | None:
    """Why `name` cannot be a branch (git's ref-name rules, kept strict), or None."""
    if not name or len(name) > BRANCH_LIMIT:
        return f"must be 1 to {BRANCH_LIMIT} characters"
    if any(ch in _BRANCH_FORBIDDEN or ord(ch) < 32 for ch in name):
        return "holds a character git refuses in a branch name"
    if name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock")) or name == "@":
        return "is not a valid branch name"
    if ".." in name or "@{" in name or "//" in name:
        return "is not a valid branch name"
    if any(part.startswith(".") for part in name.split("/")):
        return "is not a valid branch name"
    return None


async def clone(
    url: str, dest: Path, repo_branch: str | None = None, branch: str | None = None
) -> None:
    """Clone `url` at `repo_branch` (its default when None), then check out `branch`,
    made from there when the remote has no such branch."""
    picked = ["--branch", repo_branch] if repo_branch else []
    await git("clone", "--quiet", *picked, "--", url, str(dest), failure=f"cannot clone {url}")
    if not branch or branch == repo_branch:
        return
    remote = f"refs/remotes/origin/{branch}"
    if await git("-C", str(dest), "rev-parse", "--verify", "--quiet", remote, check=False):
        args = ["checkout", "--quiet", "-b", branch, "--track", f"origin/{branch}"]
    else:
        args = ["checkout", "--quiet", "-b", branch]
    await git("-C", str(dest), *args, failure=f"cannot check out branch {branch}")


async def git(*args: str, failure: str = "git failed", check: bool = True) -> bool:
    """Run git without a terminal, within the clone timeout; False (or `sandbox_spawn_failed`
    with git's own last words when `check`) when it fails."""
    program = shutil.which("git")
    if program is None:
        raise EngineError("sandbox_spawn_failed", "git is not installed: cannot clone the repo")
    proc = await asyncio.create_subprocess_exec(
        program,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **GIT_ENV},
        start_new_session=True,  # no controlling terminal to ask a password on
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), CLONE_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EngineError(
            "sandbox_spawn_failed", f"{failure}: git took over {CLONE_TIMEOUT_SECONDS:.0f} s"
        ) from None
    if proc.returncode == 0:
        return True
    if not check:
        return False
    lines = [line for line in err.decode(errors="replace").strip().splitlines() if line.strip()]
    raise EngineError("sandbox_spawn_failed", f"{failure}: {lines[-1] if lines else 'git failed'}")
