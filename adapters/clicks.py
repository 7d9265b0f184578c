"""A click on one of the adapter's buttons, the same on every platform: decided if the
person may, its outcome shown where the platform shows it, and — when no renderer of
this process shows the turn (the adapter restarted while it waited) — the rest of the
turn shown below the choice (see showing.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from adapters.actions import Action
from adapters.conversations import Answers, Conversations, Decision
from adapters.policy import Actor
from adapters.showing import Follow
from adapters.surface import Surface
from adapters.views import OutcomeMarks, outcome_line

# The verbs that answer a choice (`stop` ends a turn: nothing to follow).
CHOICE_VERBS = frozenset({"allow", "deny", "answer", "submit"})

# Shows a decision on the platform: the clicked message's outcome line when answered
# (the line is "" otherwise), or the reason to the person who clicked.
ShowOutcome = Callable[[Decision, str], Awaitable[None]]


async def click(
    conversations: Conversations,
    actor: Actor,
    action: Action,
    answers: Answers | None,
    *,
    marks: OutcomeMarks,
    show_outcome: ShowOutcome,
    rest_on: Callable[[], Surface],
) -> Decision:
    follow = await _follow(conversations, action)
    try:
        decision = await conversations.decide(actor, action, answers)
        if decision.outcome != "answered" and follow is not None:
            await follow.close()
            follow = None
        line = ""
        if decision.outcome == "answered":
            line = outcome_line(actor.user_id, action.verb, answers, marks)
        await show_outcome(decision, line)
    except BaseException:
        if follow is not None:
            await follow.close()
        raise
    if follow is not None:
        await follow.show(rest_on())
    return decision


async def _follow(conversations: Conversations, action: Action) -> Follow | None:
    """The turn's events, when no renderer here shows it (the adapter restarted meanwhile)."""
    shows = conversations.shows
    if action.verb not in CHOICE_VERBS or shows.shown(action.loop_id):
        return None
    return await shows.attach(action.loop_id)
