"""Whether the podman sandbox can run on this machine, for the modules that need it."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from core.config import Settings
from core.engine import bundled_cli
from core.errors import SettingsError
from core.sandbox import choose_sandbox


async def podman_problem() -> str | None:
    """Why the podman sandbox cannot run here, as `loopbridge serve` says it; None if it can."""
    with tempfile.TemporaryDirectory(prefix="lb-probe-") as home:
        try:
            sandbox = await choose_sandbox(
                Settings(sandbox="podman", home=Path(home)), bundled_cli()
            )
        except SettingsError as exc:
            return str(exc)
        await sandbox.close()
    return None


def deep_home(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A data dir whose path is over 100 characters: Unix socket paths (107 bytes at most)
    must not depend on it."""
    home = tmp_path_factory.mktemp(name) / ("deep-" * 16) / "data"
    assert len(str(home)) > 100
    return home


def skip_without_podman() -> None:
    """Skip the calling test module, with the reason, where podman cannot run."""
    problem = asyncio.run(podman_problem())
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)
