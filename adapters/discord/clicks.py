"""Clicks on the adapter's buttons and select menus.

Discord wants an interaction answered within 3 seconds, so a click is
acknowledged first (a deferred update: the message stays as it is) and carried
out after. Who decided what is then shown by editing the clicked message
through the interaction; a click that changes nothing gets a private answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import discord

from adapters.actions import Action
from adapters.conversations import Conversations
from adapters.discord.components import answers_of, is_pick, picked_view
from adapters.discord.content import with_outcome
from adapters.discord.follow import Follow, Followers
from adapters.discord.incoming import actor_of
from adapters.surface import Surface
from adapters.views import OutcomeMarks, outcome_line

log = logging.getLogger(__name__)

CHOICE_VERBS = frozenset({"allow", "deny", "answer", "submit"})
NO_LONGER_PENDING = "-# No longer pending."
NO_MENTIONS = discord.AllowedMentions.none()


class Clicks:
    def __init__(
        self,
        conversations: Conversations,
        followers: Followers,
        surface_for: Callable[[int], Surface],
    ) -> None:
        self.conversations = conversations
        self.followers = followers
        self.surface_for = surface_for

    async def handle(self, interaction: discord.Interaction, action: Action) -> None:
        if is_pick(interaction, action):
            await interaction.response.edit_message(view=picked_view(interaction))
            return
        await interaction.response.defer()
        answers = answers_of(interaction, action)
        actor = actor_of(interaction.user)
        follow = await self._follow(action)
        try:
            decision = await self.conversations.decide(actor, action, answers)
        except BaseException:
            if follow is not None:
                await follow.close()
            raise
        if follow is not None and decision.outcome != "answered":
            await follow.close()
            follow = None
        if decision.outcome in ("not_allowed", "gone", "failed"):
            await interaction.followup.send(decision.message, ephemeral=True)
            if decision.outcome == "gone" and action.verb in CHOICE_VERBS:
                await self._show(interaction, NO_LONGER_PENDING)
            return
        if decision.outcome == "answered":
            line = outcome_line(actor.user_id, action.verb, answers, OUTCOME_MARKS)
            await self._show(interaction, line)
            if follow is not None:
                assert interaction.channel_id is not None  # a click is always in a channel
                await follow.show(self.surface_for(interaction.channel_id))

    async def _follow(self, action: Action) -> Follow | None:
        """The turn's events, when no renderer here shows it (the bot restarted meanwhile)."""
        if action.verb not in CHOICE_VERBS or self.followers.shown(action.loop_id):
            return None
        return await self.followers.attach(action.loop_id)

    async def _show(self, interaction: discord.Interaction, line: str) -> None:
        """The clicked message without its controls, and `line` below its text."""
        content = interaction.message.content if interaction.message is not None else ""
        try:
            await interaction.edit_original_response(
                content=with_outcome(content, line), view=None, allowed_mentions=NO_MENTIONS
            )
        except discord.HTTPException as exc:
            log.warning("could not show a choice's outcome: %s", exc)


OUTCOME_MARKS = OutcomeMarks(
    "✅", "🚫", "☑️", bold=lambda text: f"**{discord.utils.escape_markdown(text)}**"
)
