"""Shared fixtures: the stand-in model, and a loop server running the real agent CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn

from bridge.server.app import create_app
from bridge.server.net import listen
from bridge.server.protocol import server_config
from bridge.standin import StandinModel
from core.config import load_settings
from core.engine import Engine

# Every temporary directory of the suite, and so every data directory, lies over 100
# characters deep: nothing may depend on a short one (Unix socket paths hold 107 bytes).
DEEP = "deep-path-" * 8


def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None:
        root = Path(tempfile.gettempdir()) / f"loopbridge-tests-{os.getpid()}"
        root.mkdir(mode=0o700, exist_ok=True)
        config.option.basetemp = str(root / DEEP)
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


AGENT_ENV = {
    "ANTHROPIC_API_KEY": "sk-standin",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    # A broken stand-in must fail a test fast, not after ten backed-off retries.
    "CLAUDE_CODE_MAX_RETRIES": "0",
}


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def standin() -> AsyncIterator[StandinModel]:
    model = StandinModel()
    url = await model.start()
    saved = {key: os.environ.get(key) for key in [*AGENT_ENV, "ANTHROPIC_BASE_URL"]}
    os.environ.update({**AGENT_ENV, "ANTHROPIC_BASE_URL": url})
    yield model
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    await model.stop()


@dataclass
class Server:
    """A running loop server on 127.0.0.1 and a client for one user."""

    engine: Engine
    url: str
    home: Path
    token: str
    http: httpx.AsyncClient
    uvicorn: uvicorn.Server
    task: asyncio.Task[None]
    standin: StandinModel | None = None

    def standin_requests(self) -> list[dict]:
        """The model requests of conversation turns so far (side calls left out)."""
        return self.standin.main_requests()

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url + "/api/v1", headers=headers, timeout=60)

    async def token_for(self, user: str) -> str:
        await self.engine.accounts.ensure_user(user)
        _, token = await self.engine.accounts.create_token(user, "test")
        return token

    async def stop(self) -> None:
        await self.http.aclose()
        self.uvicorn.should_exit = True
        await self.task


async def start_server(home: Path, **settings: object) -> Server:
    # Engine tests run agents as local processes (as loopbridge-agent when root) unless
    # LOOPBRIDGE_TEST_SANDBOX names another backend; sandbox tests ask for theirs.
    settings.setdefault("sandbox", os.environ.get("LOOPBRIDGE_TEST_SANDBOX", "local"))
    engine = Engine(load_settings(home=home, **settings))
    await engine.start()
    app = create_app(engine, manage_engine=False)
    listener = listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    config = server_config(app, engine.settings, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    await engine.accounts.ensure_user("alice")
    _, token = await engine.accounts.create_token("alice", "test")
    http = httpx.AsyncClient(
        base_url=url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    return Server(engine, url, home, token, http, server, task)


async def stop_server(server: Server) -> None:
    await server.stop()
    await server.engine.close()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def server(
    standin: StandinModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    running = await start_server(tmp_path_factory.mktemp("home"))
    running.standin = standin
    yield running
    await stop_server(running)
