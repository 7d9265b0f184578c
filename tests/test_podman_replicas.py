"""Replicas sharing a data directory each touch only their own podman containers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from core.config import Settings
from core.engine import bundled_cli
from core.sandbox.base import SandboxSpec
from core.sandbox.podman import REPLICA_LABEL, PodmanSandbox
from tests.podman import deep_home, skip_without_podman

skip_without_podman()

CLI = bundled_cli()


def settings(home: Path, replica: str) -> Settings:
    return Settings(
        sandbox="podman", sandbox_network="none", sandbox_pids=64, sandbox_memory="512m",
        sandbox_cpus=1.0, home=home, replica_id=replica,
    )  # fmt: skip


@pytest_asyncio.fixture(loop_scope="session")
async def home(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    home = deep_home(tmp_path_factory, "replicas")
    home.mkdir(parents=True)
    yield home


async def running(box: PodmanSandbox) -> set[str]:
    """The loops whose containers `box` sees on its data dir, whoever made them, by replica."""
    containers = await box.call(box.api.containers.list, all=True, filters=[
        f"label=loopbridge.server={box.data_dir}"
    ])  # fmt: skip
    return {f"{c.labels[REPLICA_LABEL]}/{c.labels['loopbridge.loop']}" for c in containers}


async def test_each_replica_removes_only_its_own_containers(home: Path) -> None:
    one = PodmanSandbox(home, CLI, settings(home, "one"))
    two = PodmanSandbox(home, CLI, settings(home, "two"))
    again: PodmanSandbox | None = None
    await one.start()
    try:
        await two.start()
        assert one.sockets != two.sockets, "each replica runs its own podman service socket"
        await one.acquire(SandboxSpec("loop_a", {}))
        await two.acquire(SandboxSpec("loop_b", {}))
        # The same loop on both (as after a failover) is two containers, not a name clash.
        await two.acquire(SandboxSpec("loop_a", {}))
        assert await running(one) == {"one/loop_a", "two/loop_b", "two/loop_a"}

        # Replica one starts again (its old run died): it removes its own leftovers only.
        again = PodmanSandbox(home, CLI, settings(home, "one"))
        await again.start()
        assert await running(again) == {"two/loop_b", "two/loop_a"}
        await again.acquire(SandboxSpec("loop_c", {}))

        # Replica two dies without closing: its watchdog removes its containers only.
        assert two.watchdog is not None and two.watchdog.stdin is not None
        two.watchdog.stdin.close()
        await two.watchdog.wait()
        two.watchdog = None
        assert await running(again) == {"one/loop_c"}

        # A clean stop of one replica leaves the other's.
        await two.acquire(SandboxSpec("loop_b", {}))
        await again.close()
        again = None
        assert await running(two) == {"two/loop_b"}
    finally:
        for box in (again, two, one):
            if box is not None:
                await box.close()
