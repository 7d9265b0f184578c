"""The `local` backend: the agent CLI runs as a plain subprocess in the loop's directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from core.sandbox.base import AgentHost, Sandbox, SandboxSpec

# The SDK hands the CLI its whole environment; this launcher drops everything the
# engine did not choose, so the server's own secrets never reach the agent.
LAUNCHER = """\
import os, sys
keep = set(os.environ.get("LOOPBRIDGE_AGENT_ENV", "").split())
prefixes = ("CLAUDE_CODE_", "CLAUDE_AGENT_SDK_", "ANTHROPIC_")
env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(prefixes)}
cli = os.environ["LOOPBRIDGE_AGENT_CLI"]
os.execve(cli, [cli, *sys.argv[1:]], env)
"""


class LocalSandbox(Sandbox):
    name = "local"

    def __init__(self, data_dir: Path, cli_path: Path) -> None:
        super().__init__(data_dir, cli_path)
        self.launcher = data_dir / "bin" / "agent-launch"

    async def start(self) -> None:
        self.launcher.parent.mkdir(parents=True, exist_ok=True)
        self.launcher.write_text(f"#!{sys.executable} -S\n{LAUNCHER}")
        self.launcher.chmod(0o755)

    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        await self.prepare_dirs(spec)
        workdir = self.workdir(spec.loop_id)
        home = self.home(spec.loop_id)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **spec.env,
        }
        env["LOOPBRIDGE_AGENT_ENV"] = " ".join(sorted(env))
        env["LOOPBRIDGE_AGENT_CLI"] = str(self.cli_path)
        host = AgentHost(cli_path=str(self.launcher), cwd=str(workdir), env=env, workdir=workdir)
        # A local process has nothing to start beyond the agent itself.
        return host, False
