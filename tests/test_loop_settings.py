"""Profiles, vaults and repos from the settings file, and what the agent may see."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import start_server, stop_server
from tests.sse import text_of, turn

BYPASS = {"permission_mode": "bypassPermissions"}


def make_repo(repo: Path) -> Path:
    repo.mkdir()
    (repo / "README.txt").write_text("from the repo\n")
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "."],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"],
    ):
        subprocess.run(command, cwd=repo, check=True)
    return repo


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def configured(standin, tmp_path_factory):
    root = tmp_path_factory.mktemp("configured")
    repo = await asyncio.to_thread(make_repo, root / "sample-repo")
    config = root / "loopbridge.toml"
    config.write_text(
        f"""
[profiles.reviewer]
system_prompt = "PROFILE-MARKER: you review code."
disallowed_tools = ["WebFetch"]

[vaults.team]
env = {{ TEAM_SECRET = "s3cr3t-team" }}

[repos.sample]
url = "{repo}"

[repos.gone]
url = "{root / "no-such-repo"}"
"""
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPBRIDGE_CONFIG", str(config))
        patch.setenv("LOOPBRIDGE_SERVER_ONLY_SECRET", "never-for-agents")
        server = await start_server(root / "home")
        server.standin = standin
        yield server
        await stop_server(server)


async def _create(server, **body) -> dict:
    r = await server.http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def test_loop_records_its_profile_vault_and_repo(configured):
    loop = await _create(configured, profiles=["reviewer"], vault="team", repo="sample")
    assert (loop["profiles"], loop["vault"], loop["repo"]) == (["reviewer"], "team", "sample")
    fresh = await _create(configured)
    assert (
        fresh["title"],
        fresh["metadata"],
        fresh["profiles"],
        fresh["vault"],
        fresh["repo"],
    ) == (
        "untitled",
        {},
        [],
        "default",
        None,
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"profiles": ["nope"]}, "unknown_profile"),
        ({"vault": "nope"}, "unknown_vault"),
        ({"repo": "nope"}, "unknown_repo"),
    ],
)
async def test_unknown_names_are_refused(configured, body, code):
    r = await configured.http.post("/loops", json=body)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "code": code,
        "message": r.json()["error"]["message"],
    }


async def test_repo_clone_vault_env_and_profile_prompt_reach_the_agent(configured):
    loop = await _create(configured, profiles=["reviewer"], vault="team", repo="sample")
    evs = await turn(
        configured.http,
        loop["id"],
        "[[bash: cat README.txt; echo $TEAM_SECRET > vault.txt]]",
        **BYPASS,
    )
    assert "from the repo" in text_of(evs)
    workdir = configured.engine.sandbox.workdir(loop["id"])
    assert (workdir / "vault.txt").read_text() == "s3cr3t-team\n"
    system = json.dumps(configured.standin_requests()[-1]["system"])
    assert "PROFILE-MARKER: you review code." in system


async def test_agent_sees_only_its_own_environment_and_never_the_metadata(configured):
    loop = await _create(configured, metadata={"slack_thread": "C123:METADATA-MARKER"})
    await turn(configured.http, loop["id"], "[[bash: env > env.txt]]", **BYPASS)
    env = (configured.engine.sandbox.workdir(loop["id"]) / "env.txt").read_text()
    assert "ANTHROPIC_BASE_URL=" in env
    assert "never-for-agents" not in env
    assert "TEAM_SECRET" not in env  # another vault's variable
    assert "METADATA-MARKER" not in env
    assert all("METADATA-MARKER" not in json.dumps(r) for r in configured.standin_requests())


async def test_a_repo_that_cannot_be_cloned_fails_the_turn_not_the_loop(configured):
    loop = await _create(configured, repo="gone")
    evs = await turn(configured.http, loop["id"], "hello")
    assert [e.name for e in evs] == ["error"]
    assert evs[0].data["code"] == "sandbox_spawn_failed"
    assert "cannot clone" in evs[0].data["message"]
    history = (await configured.http.get(f"/loops/{loop['id']}/messages")).json()["data"]
    assert history[0]["ended"] == "error"
    assert history[0]["error"]["code"] == "sandbox_spawn_failed"
