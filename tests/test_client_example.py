"""examples/client_example.py, run as a person would run it, against a running server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "client_example.py"


async def run_example(server, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "LOOPBRIDGE_API_URL": server.url, "LOOPBRIDGE_API_TOKEN": server.token}
    # Asynchronously: the server under test runs in this event loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def test_the_client_example_streams_a_turn_and_answers_its_choice(server):
    code, out, err = await run_example(server, "[[bash: echo hi > example.txt]]", "--allow")
    assert code == 0, err
    assert out.startswith("loop loop_")
    assert "[tool Bash: echo hi > example.txt]" in out and "[allowing Bash]" in out
    assert "[done]" in out and "history: done: 'Tool ok" in out
    loop_id = out.split()[1]
    assert (server.engine.sandbox.workdir(loop_id) / "example.txt").read_text() == "hi\n"


async def test_the_client_example_without_a_token_says_so():
    env_less = {key: value for key, value in os.environ.items() if key != "LOOPBRIDGE_API_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "hi",
        env=env_less,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and "LOOPBRIDGE_API_TOKEN" in err_bytes.decode()
