"""Where a loop's agent runs: its working directory, home and process."""

from pathlib import Path

from core.sandbox.base import AgentHost, Sandbox, SandboxSpec
from core.sandbox.local import LocalSandbox

__all__ = ["AgentHost", "LocalSandbox", "Sandbox", "SandboxSpec", "make_sandbox"]


def make_sandbox(kind: str, data_dir: Path, cli_path: Path) -> Sandbox:
    if kind == "local":
        return LocalSandbox(data_dir, cli_path)
    raise ValueError(f"unknown sandbox backend {kind!r}")
