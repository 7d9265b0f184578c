"""The platform-neutral adapter part and the Slack conversions, without any server."""

from __future__ import annotations

import asyncio
import itertools
import random
import re

import pytest

from adapters.actions import Action
from adapters.dedupe import RecentKeys
from adapters.policy import Actor, Policy
from adapters.render import TurnRenderer
from adapters.slack.blocks import choice_blocks, message_blocks, selected_answers
from adapters.slack.mrkdwn import from_slack, to_mrkdwn
from adapters.split import PartSplitter, split_markdown
from adapters.views import ChoiceView, MessageView, choice_view
from bridge.standin.scenarios import long_chunks
from tests.polling import until

FENCE = re.compile(r"^ {0,3}```", re.MULTILINE)


def balanced(text: str) -> bool:
    return len(FENCE.findall(text)) % 2 == 0


# ---- splitting ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [300, 1000, 2900])
def test_parts_fit_are_balanced_and_rebuild_the_text(limit: int) -> None:
    text = "".join(long_chunks(400))
    parts = split_markdown(text, limit)
    assert all(len(part) <= limit for part in parts)
    assert all(balanced(part) for part in parts)
    rebuilt = "".join(re.sub(r"\s", "", p) for p in parts)
    # Remove the closers/openers the cuts added: what is left is the text itself.
    rebuilt = re.sub(r"```(```python)", "", rebuilt)
    assert rebuilt == re.sub(r"\s", "", text)


def test_feeding_in_random_pieces_gives_the_same_parts() -> None:
    text = "".join(long_chunks(300))
    rng = random.Random(4)
    splitter = PartSplitter(1200)
    position = 0
    while position < len(text):
        step = rng.randint(1, 400)
        splitter.feed(text[position : position + step])
        position += step
    splitter.seal()
    assert splitter.parts == split_markdown(text, 1200)


def test_a_cut_never_falls_before_what_a_stream_showed() -> None:
    splitter = PartSplitter(500)
    splitter.feed("word " * 90)  # 450 chars, shown on a stream
    shown = len(splitter.tail)
    sealed = splitter.feed("\n\nmore " * 40, keep=shown)
    assert sealed and len(sealed[0]) >= shown and sealed[0].startswith("word " * 90)


def test_a_cut_inside_code_closes_and_reopens_with_the_language() -> None:
    code = "```python\n" + "".join(f"x_{i} = {i}\n" for i in range(200)) + "```\n"
    parts = split_markdown(code, 400)
    assert len(parts) > 3
    assert all(p.startswith("```python\n") and p.rstrip().endswith("```") for p in parts)


def test_a_long_line_without_spaces_is_still_cut() -> None:
    parts = split_markdown("x" * 1000, 300)
    assert "".join(parts) == "x" * 1000 and all(len(p) <= 300 for p in parts)


# ---- mrkdwn ------------------------------------------------------------------------------


def test_markdown_becomes_mrkdwn() -> None:
    markdown = (
        "# Title\n**bold**, *it*, _it_, ~~no~~, `a<b`, [link](https://x.y/?a=1&b=2)\n"
        "- one\n  * two\n> quote **q**\n---\n```python\nif a < b && c:\n```"
    )
    assert to_mrkdwn(markdown) == (
        "*Title*\n*bold*, _it_, _it_, ~no~, `a&lt;b`, <https://x.y/?a=1&amp;b=2|link>\n"
        "• one\n  • two\n> quote *q*\n──────────\n```\nif a &lt; b &amp;&amp; c:\n```"
    )


def test_slack_text_back_to_plain() -> None:
    assert from_slack("see <https://a.b|here> &amp; &lt;x&gt;") == "see [here](https://a.b) & <x>"


# ---- the other neutral pieces ------------------------------------------------------------


def test_actions_round_trip_and_fit_discord() -> None:
    action = Action("answer", "loop_" + "a" * 24, "choice_" + "b" * 24, "q1")
    assert len(action.encode()) <= 100
    assert Action.decode(action.encode()) == action
    assert Action.decode("something else") is None


def test_recent_keys_forget_after_their_time() -> None:
    now = [0.0]
    keys = RecentKeys(ttl=10, clock=lambda: now[0])
    assert keys.first_time("a") and not keys.first_time("a")
    now[0] = 11
    assert keys.first_time("a")


def test_policy() -> None:
    policy = Policy(users=["U1", "ROLE"], admins=["ADMIN"], channels=["C1"])
    assert policy.may_send(Actor("U1"), "C1") and not policy.may_send(Actor("U1"), "C2")
    assert policy.may_send(Actor("U9", frozenset({"ROLE"})), "C1")
    assert not policy.may_send(Actor("U9"), "C1")
    assert policy.may_decide(Actor("U5"), "U5") and policy.may_decide(Actor("ADMIN"), "U5")
    assert not policy.may_decide(Actor("U6"), "U5")


def test_question_blocks_use_selects_for_multi_select() -> None:
    data = {
        "choice_id": "choice_1",
        "kind": "question",
        "payload": {
            "questions": [
                {
                    "id": "q1",
                    "question": "Pick",
                    "options": [{"label": "A"}, {"label": "B"}],
                    "multi_select": True,
                }
            ]
        },
    }
    view = choice_view("loop_1", data)
    _, blocks = choice_blocks(view)
    kinds = [e["type"] for b in blocks if b["type"] == "actions" for e in b["elements"]]
    assert kinds == ["multi_static_select", "button"]
    state = {"lb_q|q1": {"lb_pick_0": {"selected_options": [{"value": "A"}, {"value": "B"}]}}}
    assert selected_answers(state) == {"q1": ["A", "B"]}


def test_message_blocks_show_text_activity_and_stop() -> None:
    view = MessageView("loop_1", text="**hi**", activity=("running `ls`",), stop=True)
    text, blocks = message_blocks(view)
    assert text == "*hi*"  # the notification, in mrkdwn
    assert blocks[0] == {"type": "markdown", "text": "**hi**"}  # the answer, as is
    assert [b.get("block_id") for b in blocks[1:]] == ["lb_activity", "lb_controls"]


def test_a_long_answer_notifies_with_its_start_only() -> None:
    markdown = "**a & b** " * 2000
    text, blocks = message_blocks(MessageView("loop_1", text=markdown))
    assert blocks[0]["text"] == markdown.strip()
    assert text.startswith("*a &amp; b*") and len(text) <= 4000


# ---- rendering, against an in-memory surface ---------------------------------------------


class MemorySurface:
    part_limit = 500
    edit_interval = 0.2
    append_only = False

    def __init__(self) -> None:
        self.messages: dict[str, MessageView | ChoiceView] = {}
        self.order: list[str] = []
        self.calls: list[tuple[float, str, str]] = []
        self.closed: str | None = None
        self.fail_next = 0
        # Posts the platform lets through (None: no budget); each post takes one.
        self.budget: int | None = None
        self.refusals = 0  # times the renderer found no post free

    def measure(self, markdown: str) -> int:
        return len(markdown)

    def posts_free(self) -> int | None:
        if self.budget == 0:
            self.refusals += 1
        return self.budget

    def _record(self, kind: str, message_id: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("platform hiccup")
        self.calls.append((asyncio.get_running_loop().time(), kind, message_id))

    async def post(self, view: MessageView) -> str:
        message_id = f"m{len(self.order)}"
        self._record("post", message_id)
        if self.budget is not None:
            self.budget = max(0, self.budget - 1)
        self.messages[message_id] = view
        self.order.append(message_id)
        return message_id

    async def edit(self, message_id: str, view: MessageView) -> None:
        self._record("edit", message_id)
        self.messages[message_id] = view

    async def post_choice(self, view: ChoiceView) -> str:
        return await self.post(view)  # type: ignore[arg-type]

    async def edit_choice(self, message_id: str, view: ChoiceView) -> None:
        await self.edit(message_id, view)  # type: ignore[arg-type]

    async def close(self, state: str) -> None:
        self.closed = state


async def test_renderer_holds_parts_back_then_sends_the_rest_as_one_file() -> None:
    surface = MemorySurface()
    surface.budget = 2
    renderer = TurnRenderer(surface, "loop_1")
    text = "".join(long_chunks(120))
    async with renderer.running():
        renderer.started()
        renderer.add_text(text)  # all at once: ~10 parts for a budget of 2
        # The renderer has looked at the empty budget again a few times, and waited.
        await until(lambda: surface.refusals >= 3, what="the budget looked at again")
        assert len(surface.order) == 2, "parts beyond the budget wait"
        renderer.finish("done")
    first, second, rest = (surface.messages[m] for m in surface.order)
    assert isinstance(rest, MessageView) and rest.attachment and not rest.text
    assert not first.attachment and not second.attachment
    shown = first.shown_text + second.shown_text + rest.attachment
    assert shown == "".join(split_markdown(text, 500))


async def test_renderer_throttles_edits_splits_and_finishes_complete() -> None:
    surface = MemorySurface()
    surface.fail_next = 1  # the first post fails once, and is retried
    renderer = TurnRenderer(surface, "loop_1")
    text = "".join(long_chunks(120))
    async with renderer.running():
        renderer.started()
        for index in range(0, len(text), 40):
            renderer.add_text(text[index : index + 40])
            if index % 400 == 0:  # now and then, the text waits until the platform saw some
                calls = len(surface.calls)
                await until(lambda seen=calls: len(surface.calls) > seen, what="a platform call")
        renderer.finish("done")
    shown = [surface.messages[m] for m in surface.order]
    assert all(isinstance(v, MessageView) and not v.live and not v.stop for v in shown)
    assert "".join(v.shown_text for v in shown) == "".join(split_markdown(text, 500))
    assert surface.closed == "done"
    by_message: dict[str, list[float]] = {}
    for at, _, message_id in surface.calls:
        by_message.setdefault(message_id, []).append(at)
    for times in by_message.values():
        assert all(b - a >= 0.19 for a, b in itertools.pairwise(times))


async def test_renderer_puts_a_choice_between_parts_and_cancels_it_at_the_end() -> None:
    surface = MemorySurface()
    renderer = TurnRenderer(surface, "loop_1")
    async with renderer.running():
        renderer.started()
        renderer.add_text("before")
        renderer.choice(ChoiceView("loop_1", "choice_1", "permission", "Allow Bash?"))
        renderer.add_text("after")
        renderer.finish("interrupted", "Stopped.")
    views = [surface.messages[m] for m in surface.order]
    assert [type(v).__name__ for v in views] == ["MessageView", "ChoiceView", "MessageView"]
    assert views[0].text == "before" and views[2].text == "after"
    assert views[1].state == "cancelled" and views[2].state == "interrupted"


def test_streams_get_whole_lines_or_words_never_half_a_fence() -> None:
    from adapters.split import stream_safe

    assert stream_safe("one two thr") == "one two "
    assert stream_safe("line\n``") == "line\n"
    assert stream_safe("line\n```pyt") == "line\n"
    assert stream_safe("line\ncode_without_spaces") == "line\n"
    assert stream_safe("done\n") == "done\n"
