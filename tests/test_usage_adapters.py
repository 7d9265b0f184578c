"""Budgets and the audit trail as people see them in Slack and Discord (real slack-bolt and
discord.py against the fakes, a real loop server and CLI, the stand-in reporting set usage)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from core import audit
from tests.conftest import Server, start_server, stop_server
from tests.fakes.slack import FakeSlack
from tests.polling import until
from tests.test_discord import Harness as DiscordHarness
from tests.test_discord import running as running_discord
from tests.test_slack import ALICE, BOB, CHANNEL, MENTION, choice_message, loop_of
from tests.test_slack import Harness as SlackHarness
from tests.test_slack import running as running_slack
from tests.test_usage import TOKENS, reported

pytestmark = pytest.mark.asyncio(loop_scope="session")

CAROL = "U0CAROL"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def budgeted(standin, tmp_path_factory) -> AsyncIterator[Server]:
    # One turn at the stand-in's set usage ($0.017) spends a person's day.
    home = tmp_path_factory.mktemp("budgeted")
    server = await start_server(home, budgets={"author_daily_usd": 0.01})
    server.standin = standin
    yield server
    await stop_server(server)


@pytest_asyncio.fixture(loop_scope="session")
async def slack(budgeted) -> AsyncIterator[SlackHarness]:
    async with running_slack(budgeted) as harness:
        yield harness


@pytest_asyncio.fixture(loop_scope="session")
async def discord_(budgeted) -> AsyncIterator[DiscordHarness]:
    async with running_discord(budgeted) as harness:
        yield harness


async def test_slack_shows_a_budget_refusal_to_the_person_in_the_thread(
    slack: SlackHarness, standin
) -> None:
    await slack.start()
    with reported(standin):
        root = await slack.fake.say(ALICE, f"{MENTION} spend my day")
        await slack.turns(1)
        await slack.fake.say(ALICE, "and more", thread_ts=root)
        refusals = await until(
            lambda: [e for e in slack.fake.ephemerals if "Budget reached" in e["text"]],
            what="a private refusal",
        )
    refusal = refusals[0]
    assert refusal["user"] == ALICE and refusal["channel"] == CHANNEL
    assert refusal["thread_ts"] == root
    text = refusal["text"]
    assert "\n" not in text and f"slack:{ALICE}" in text and "resets at" in text
    assert [m.answer for m in slack.fake.answer_messages(CHANNEL, root)] == [
        "Echo #1: spend my day"
    ]
    # Another person in the same thread is under a budget of their own.
    await slack.fake.say(BOB, "my turn", thread_ts=root)
    await slack.turns(2)
    assert slack.answer(root).endswith("my turn")
    trail = await audit.entries(slack.server.engine.db, loop=(await loop_of(slack, root)).id)
    assert [(e.kind, e.person_id, e.detail["budget"]) for e in trail] == [
        ("budget", f"slack:{ALICE}", "author_daily_usd")
    ]
    assert slack.adapter is not None
    assert [r.handled for r in slack.adapter.results].count("refused") == 1


async def test_discord_replies_with_the_budget_refusal(discord_: DiscordHarness, standin) -> None:
    fake = discord_.fake
    await discord_.start()
    with reported(standin):
        asked = await fake.say(discord_.alice, "spend my day", mention=True)
        await discord_.turns(1)
        thread = fake.channels[asked.id]
        await fake.say(discord_.alice, "and more", channel=thread.id)
        found = await until(
            lambda: [m for m in fake.bot_messages(thread.id) if "Budget reached" in m.text],
            what="a refusal in the thread",
        )
    text = found[0].text
    assert "\n" not in text and f"discord:{discord_.alice.id}" in text and "resets at" in text
    assert discord_.answers(thread.id)[0] == "Echo #1: spend my day"


async def test_loopbridge_audit_lists_a_slack_approval_with_the_slack_user(
    slack: SlackHarness, standin
) -> None:
    await slack.start()
    free = dict.fromkeys(TOKENS, 0)  # a turn that spends nothing of Carol's budget
    with reported(standin, free):
        root = await slack.fake.say(CAROL, f"{MENTION} [[bash: echo audited > audited.txt]]")
        choice = await choice_message(slack, root)
        await slack.fake.click(CAROL, choice, "lb_allow")
        await slack.turns(1)
    loop = await slack.client.find_loop({"binding": f"slack:{FakeSlack.team_id}:{CHANNEL}:{root}"})
    history = await slack.client.history(loop.id)
    assert history.data[0].choices[0].by.id == f"slack:{CAROL}"
    env = {**os.environ, "LOOPBRIDGE_HOME": str(slack.server.home)}
    for key in [k for k in env if k.startswith("LOOPBRIDGE_BUDGETS")]:
        del env[key]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "audit",
        "--since",
        "1h",
        "--loop",
        loop.id,
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    entries = json.loads(out)
    approval = next(e for e in entries if e["kind"] == "permission")
    assert approval["person_id"] == f"slack:{CAROL}" and approval["source"] == f"slack:{CAROL}"
    assert approval["detail"]["tool"] == "Bash"
    assert "audited.txt" in approval["detail"]["input_summary"]
    assert approval["detail"]["answer"] == {"allow": True}
    assert approval["user"] == "slackbot" and approval["loop_id"] == loop.id

    lines = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "audit",
        "--since",
        "1h",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    text, _ = await asyncio.wait_for(lines.communicate(), 60)
    line = next(x for x in text.decode().splitlines() if loop.id in x and "permission" in x)
    assert f"slack:{CAROL}" in line and "allowed Bash" in line
