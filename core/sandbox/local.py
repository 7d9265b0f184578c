"""The `local` backend: the agent CLI runs as a plain process on the host.

Only for a single-user machine, and only when asked for by name
(`LOOPBRIDGE_SANDBOX=local`): an agent that runs as the server's own user can
read everything the server can, its environment (`/proc/<pid>/environ`), its
database, its settings and every loop's files. The launcher below hands the
agent only the environment the engine chose, which keeps secrets out of the
agent's own environment, not out of its reach.

When the server is root, the agent runs as the unprivileged `loopbridge-agent`
user instead, in a mount namespace of its own where `/tmp` and the first
directory on the way to the data directory that others may not enter (or the
data directory itself) are empty tmpfs, holding only the loop's working directory
and home, at their usual paths. So the data directory stays 0700 on the host, and
the agent reaches its own directories but no other loop's, nor the database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from core.errors import EngineError
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec, write_script
from core.sandbox.env import python_prefixes
from core.sandbox.image import run
from core.sandbox.users import AGENT_USER, AgentUser, agent_user, give_tree

TMP = Path("/tmp")

# The SDK hands the launcher its whole environment; it keeps what the engine chose.
# As root, it then makes the private view, becomes the agent's user, and asks the
# kernel to end the agent when the server ends (set last: a change of uid clears it).
LAUNCHER = """\
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
keep = set(os.environ.get("LOOPBRIDGE_AGENT_ENV", "").split())
prefixes = {prefixes}
env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(prefixes)}
cli = os.environ["LOOPBRIDGE_AGENT_CLI"]
server = int(os.environ["LOOPBRIDGE_SERVER_PID"])
view = os.environ.get("LOOPBRIDGE_AGENT_VIEW")


def check(result, what):
    if result != 0:
        sys.exit(f"loopbridge: cannot {what}: {os.strerror(ctypes.get_errno())}")


if view:
    tops, binds, uid, gid = json.loads(view)
    cwd = os.getcwd()
    check(libc.unshare(0x20000), "make a mount namespace (the agent's own view)")
    check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "make / private")
    # Opened in the new namespace (a bind's source must be in it), before the tmpfs hides them.
    held = [(os.open(path, os.O_PATH), path, read_only) for path, read_only in binds]
    for top in tops:
        mode = b"mode=1777" if top == "/tmp" else b"mode=0755"
        check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", 0x2 | 0x4, mode), "hide " + top)
    for fd, path, read_only in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        source = f"/proc/self/fd/{fd}".encode()
        check(libc.mount(source, path.encode(), None, 0x1000 | 0x4000, None), "bind " + path)
        if read_only:
            flags = 0x1000 | 0x20 | 0x1 | 0x4000
            check(libc.mount(None, path.encode(), None, flags, None), "make read-only " + path)
        os.close(fd)
    os.chdir(cwd)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
check(libc.prctl(1, signal.SIGTERM), "ask to end with the server")
if os.getppid() != server:
    sys.exit(1)
os.execve(cli, [cli, *sys.argv[1:]], env)
"""


class LocalSandbox(Sandbox):
    name = "local"

    def __init__(self, data_dir: Path, cli_path: Path) -> None:
        super().__init__(data_dir, cli_path)
        self.launcher = data_dir / "bin" / "agent-launch"
        self.user: AgentUser | None = None

    async def start(self) -> None:
        self.launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher = LAUNCHER.replace("{prefixes}", python_prefixes())
        write_script(self.launcher, f"#!{sys.executable} -S\n{launcher}")
        self.user = await agent_user()
        if self.user is not None:
            await self.try_view()

    async def try_view(self) -> None:
        """Run `true` the way an agent runs: better to know at start than at a turn."""
        probe = self.data_dir / "sandbox" / "probe"
        (probe / "work").mkdir(parents=True, exist_ok=True)
        (probe / "home").mkdir(exist_ok=True)
        env = self.environment(probe / "work", probe / "home", {})
        env["LOOPBRIDGE_AGENT_CLI"] = "/bin/true"
        try:
            await run(str(self.launcher), cwd=probe / "work", env=env)
        except EngineError as exc:
            raise EngineError(
                exc.code, f"local agents cannot run as {AGENT_USER}: {exc.message}"
            ) from None

    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        await self.prepare_dirs(spec)
        workdir = self.workdir(spec.loop_id)
        env = self.environment(workdir, self.home(spec.loop_id), spec.env)
        host = AgentHost(cli_path=str(self.launcher), cwd=str(workdir), env=env, workdir=workdir)
        # A local process has nothing to start beyond the agent itself.
        return host, False

    async def prepare_dirs(self, spec: SandboxSpec) -> bool:
        new = await super().prepare_dirs(spec)
        if self.user is not None:
            user = self.user
            await asyncio.to_thread(give_tree, self.loop_dir(spec.loop_id), user.uid, user.gid)
        return new

    def environment(self, workdir: Path, home: Path, chosen: dict[str, str]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **chosen,
        }
        env["LOOPBRIDGE_AGENT_ENV"] = " ".join(sorted(env))
        env["LOOPBRIDGE_AGENT_CLI"] = str(self.cli_path)
        env["LOOPBRIDGE_SERVER_PID"] = str(os.getpid())
        if self.user is not None:
            binds = [(str(workdir), False), (str(home), False)]
            # A /tmp of its own too: the CLI keeps its tasks' output there.
            tops = [TMP, *(t for t in [hidden_top(self.data_dir)] if not t.is_relative_to(TMP))]
            if any(self.cli_path.is_relative_to(top) for top in tops):
                binds.append((str(self.cli_path.parent), True))
            view = [[str(top) for top in tops], binds, self.user.uid, self.user.gid]
            env["LOOPBRIDGE_AGENT_VIEW"] = json.dumps(view)
        return env


def hidden_top(data_dir: Path) -> Path:
    """The directory to cover: the first on the way to the data dir that others may not
    enter (the agent's user could not pass it), else the data dir itself."""
    for parent in [*reversed(data_dir.parents), data_dir]:
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return data_dir
