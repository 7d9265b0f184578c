"""A loop's permission mode changes freely between turns, in every direction, on a warm
agent: locally and in a Podman sandbox."""

from __future__ import annotations

import pytest

from tests.conftest import Server, start_server, stop_server
from tests.podman import podman_problem
from tests.sse import TERMINAL, Ev, events, names


async def mode_turn(server: Server, loop: str, mode: str, content: str) -> list[Ev]:
    """One turn in `mode`; a permission asked for is denied."""
    seen: list[Ev] = []
    body = {"content": content, "permission_mode": mode}
    async for ev in events(server.http, "POST", f"/loops/{loop}/messages", json=body):
        seen.append(ev)
        if ev.name == "requires_choice":
            choice = ev.data["choice_id"]
            r = await server.http.post(f"/loops/{loop}/choices/{choice}", json={"allow": False})
            assert r.status_code == 202, r.text
        if ev.name in TERMINAL:
            break
    return seen


# (mode, what the turn asks for, whether the agent must ask, whether the file is made)
STEPS = [
    ("default", "[[bash: echo 1 > one.txt]]", True, None),
    ("bypassPermissions", "[[bash: echo 2 > two.txt]]", False, "two.txt"),
    ("default", "[[bash: echo 3 > three.txt]]", True, None),
    ("acceptEdits", "[[write: four.txt :: 4]]", False, "four.txt"),
    ("plan", "hello", False, None),
    ("bypassPermissions", "[[bash: echo 6 > six.txt]]", False, "six.txt"),
    ("plan", "hello again", False, None),
    ("acceptEdits", "[[bash: python3 -c 1]]", True, None),  # not an edit: it asks
    ("default", "[[write: nine.txt :: 9]]", True, None),
    ("dontAsk", "[[bash: echo 10 > ten.txt]]", False, None),
    ("bypassPermissions", "[[bash: echo 11 > eleven.txt]]", False, "eleven.txt"),
]


async def switch_modes(server: Server) -> None:
    r = await server.http.post("/loops", json={})
    loop = r.json()["id"]
    workdir = server.engine.sandbox.workdir(loop)
    for number, (mode, content, asks, made) in enumerate(STEPS, 1):
        evs = await mode_turn(server, loop, mode, content)
        shown = [(e.name, e.data) for e in evs if e.name != "assistant_delta"]
        what = f"turn {number} ({mode}): {shown}"
        assert evs[-1].name == "done", what
        assert evs[0].data["cold_start"] is (number == 1), what  # one warm agent throughout
        assert ("requires_choice" in names(evs)) is asks, what
        if made is not None:
            assert (workdir / made).is_file(), what
    assert not (workdir / "one.txt").exists() and not (workdir / "ten.txt").exists()


async def test_modes_switch_freely_on_a_warm_agent(server):
    await switch_modes(server)


async def test_modes_switch_freely_in_a_podman_sandbox(standin, tmp_path):
    problem = await podman_problem()
    if problem is not None:
        pytest.skip(problem)
    server = await start_server(tmp_path, sandbox="podman")
    try:
        await switch_modes(server)
    finally:
        await stop_server(server)
