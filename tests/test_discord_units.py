"""The Discord adapter's parts that need no server: budget, content, controls, invite URL."""

from __future__ import annotations

import asyncio

import discord
import pytest

from adapters.actions import Action
from adapters.discord.access import PERMISSIONS, application_id, invite_url
from adapters.discord.components import choice_view as controls
from adapters.discord.content import CONTENT_LIMIT, choice_content, measure, status_embed
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.views import ChoiceView, MessageView, choice_view

LOOP = "loop_" + "a" * 24
CHOICE = "choice_" + "b" * 24


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_budget_keeps_a_slot_in_hand_and_one_for_final_calls() -> None:
    clock = Clock()
    budget = ChannelBudget(5, 5.0, clock=clock)
    for _ in range(3):  # live calls: 5 - 1 in hand - 1 reserved
        async with budget.slot(1, "edit", live=True):
            pass
    waiting = asyncio.create_task(_take(budget, 1, live=True))
    await asyncio.sleep(0.01)
    assert not waiting.done(), "a fourth live edit within the window must wait"
    async with budget.slot(1, "edit", live=False):  # the final edit finds its slot at once
        pass
    async with budget.slot(1, "post", live=True):  # posts are another bucket
        pass
    async with budget.slot(2, "edit", live=True):  # and so is another channel
        pass
    clock.now += 5.0
    await asyncio.wait_for(waiting, 1.0)


async def _take(
    budget: ChannelBudget, channel: int, *, live: bool, first_words: bool = False
) -> None:
    async with budget.slot(channel, "edit", live=live, first_words=first_words):
        pass


async def test_a_turns_first_words_take_the_slot_in_hand() -> None:
    clock = Clock()
    budget = ChannelBudget(5, 5.0, clock=clock)
    for live in (True, True, True, False):  # a previous answer's edits and its final one
        await _take(budget, 1, live=live)
    # The next turn's first words find the slot kept in hand; nothing else would.
    await asyncio.wait_for(_take(budget, 1, live=True, first_words=True), 1.0)
    waiting = asyncio.create_task(_take(budget, 1, live=True, first_words=True))
    await asyncio.sleep(0.01)
    assert not waiting.done(), "Discord's whole budget is used: even first words wait"
    waiting.cancel()


async def test_a_slot_counts_from_when_its_call_finished() -> None:
    clock = Clock()
    budget = ChannelBudget(2, 5.0, reserve=0, clock=clock)  # one usable slot
    async with budget.slot(1, "edit", live=False):
        clock.now += 3.0  # a slow call
    clock.now += 4.0  # 7 s after it started, 4 s after Discord may have counted it
    waiting = asyncio.create_task(_take(budget, 1, live=False))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    clock.now += 1.0
    await asyncio.wait_for(waiting, 1.0)


def test_content_is_the_answer_and_status_goes_in_an_embed() -> None:
    live = MessageView(LOOP, text="Hello **there**", activity=("running `ls`",), stop=True)
    embed = status_embed(live)
    assert embed is not None and embed.description == "running `ls`"
    thinking = status_embed(MessageView(LOOP))
    assert thinking is not None and thinking.description == "…"
    assert status_embed(MessageView(LOOP, text="done", state="done")) is None
    stopped = status_embed(MessageView(LOOP, text="x", state="interrupted", note="Stopped."))
    assert stopped is not None and "Stopped." in (stopped.description or "")
    empty = status_embed(MessageView(LOOP, state="done"))
    assert empty is not None, "Discord refuses a message with nothing in it"


def test_measure_never_undercounts_what_discord_counts() -> None:
    assert measure("abc") == 3
    assert measure("🙂") == 2  # one code point, two UTF-16 units


def test_a_huge_permission_detail_still_fits_with_its_outcome() -> None:
    view = choice_view(
        LOOP,
        {
            "choice_id": CHOICE,
            "kind": "permission",
            "payload": {"tool": "Bash", "input_summary": "echo ```" + "x" * 5000},
        },
    )
    text = choice_content(view)
    assert measure(text) <= 1700 and text.count("```") % 2 == 0
    answered = choice_content(view.finished("resolved", "Answered via api"))
    assert measure(answered) <= CONTENT_LIMIT and answered.endswith("Answered via api")


def _custom_ids(view: discord.ui.View) -> list[str]:
    return [str(item.custom_id) for item in view.children]  # type: ignore[attr-defined]


def test_controls_fit_discords_limits_and_say_what_they_do() -> None:
    permission = controls(ChoiceView(LOOP, CHOICE, "permission", "Allow Bash?"))
    assert permission is not None
    ids = _custom_ids(permission)
    assert [Action.decode(i).verb for i in ids] == ["allow", "deny"]  # type: ignore[union-attr]
    assert all(len(i) <= 100 for i in ids)

    many = [{"label": f"option {n}"} for n in range(30)]
    question = choice_view(
        LOOP,
        {
            "choice_id": CHOICE,
            "kind": "question",
            "payload": {"questions": [{"id": "q1", "question": "Which?", "options": many}]},
        },
    )
    menu = controls(question)
    assert menu is not None
    [select] = menu.children
    assert isinstance(select, discord.ui.Select) and len(select.options) == 25

    several = choice_view(
        LOOP,
        {
            "choice_id": CHOICE,
            "kind": "question",
            "payload": {
                "questions": [
                    {"id": "q1", "question": "A?", "options": [{"label": "x"}]},
                    {
                        "id": "q2",
                        "question": "B?",
                        "multi_select": True,
                        "options": [{"label": "y"}, {"label": "z"}],
                    },
                ]
            },
        },
    )
    view = controls(several)
    assert view is not None
    verbs = [Action.decode(i).verb for i in _custom_ids(view)]  # type: ignore[union-attr]
    assert verbs == ["answer", "answer", "submit"]
    assert view.children[1].max_values == 2  # type: ignore[attr-defined]
    assert controls(question.finished("resolved", "done")) is None


def test_the_invite_url_and_the_application_id() -> None:
    token = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GfAKEx.fake-signature"
    assert application_id(DiscordSettings(token=token)) == "1100000000000000001"
    set_explicitly = DiscordSettings(token=token, application_id="42")
    assert "client_id=42" in invite_url(set_explicitly)
    url = invite_url(DiscordSettings(token=token))
    assert f"permissions={PERMISSIONS.value}" in url and "applications.commands" in url
    with pytest.raises(ValueError, match="APPLICATION_ID"):
        application_id(DiscordSettings(token="not-a-token"))


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBRIDGE_DISCORD_TOKEN", "t")
    monkeypatch.setenv("LOOPBRIDGE_DISCORD_ADMINS", "111, 222")
    monkeypatch.setenv("LOOPBRIDGE_DISCORD_BOUND_CHANNELS", "333")
    monkeypatch.setenv("LOOPBRIDGE_DISCORD_API_URL", "")
    settings = DiscordSettings()
    assert settings.configured and settings.admins == ["111", "222"]
    assert settings.bound_channels == ["333"] and settings.api_url is None
