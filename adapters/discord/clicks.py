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
from adapters.clicks import CHOICE_VERBS, click
from adapters.conversations import Conversations, Decision
from adapters.discord.components import answers_of, is_pick, picked_view
from adapters.discord.content import with_outcome
from adapters.discord.incoming import actor_of
from adapters.surface import Surface
from adapters.views import OutcomeMarks

log = logging.getLogger(__name__)

NO_LONGER_PENDING = "-# No longer pending."
NO_MENTIONS = discord.AllowedMentions.none()
OUTCOME_MARKS = OutcomeMarks(
    "✅", "🚫", "☑️", bold=lambda text: f"**{discord.utils.escape_markdown(text)}**"
)


class Clicks:
    def __init__(self, conversations: Conversations, surface_for: Callable[[int], Surface]) -> None:
        self.conversations = conversations
        self.surface_for = surface_for

    async def handle(self, interaction: discord.Interaction, action: Action) -> None:
        if is_pick(interaction, action):
            await interaction.response.edit_message(view=picked_view(interaction))
            return
        await interaction.response.defer()
        channel_id = interaction.channel_id
        assert channel_id is not None  # a click is always in a channel

        async def show_outcome(decision: Decision, line: str) -> None:
            if decision.outcome in ("not_allowed", "gone", "failed"):
                await interaction.followup.send(decision.message, ephemeral=True)
                if decision.outcome == "gone" and action.verb in CHOICE_VERBS:
                    await self._show(interaction, NO_LONGER_PENDING)
            elif decision.outcome == "answered":
                await self._show(interaction, line)

        await click(
            self.conversations,
            actor_of(interaction.user),
            action,
            answers_of(interaction, action),
            marks=OUTCOME_MARKS,
            show_outcome=show_outcome,
            rest_on=lambda: self.surface_for(channel_id),
        )

    async def _show(self, interaction: discord.Interaction, line: str) -> None:
        """The clicked message without its controls, and `line` below its text."""
        content = interaction.message.content if interaction.message is not None else ""
        try:
            await interaction.edit_original_response(
                content=with_outcome(content, line), view=None, allowed_mentions=NO_MENTIONS
            )
        except discord.HTTPException as exc:
            log.warning("could not show a choice's outcome: %s", exc)
