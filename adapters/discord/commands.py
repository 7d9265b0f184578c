"""Slash commands: `/loop new [title]`, `/loop stop`, `/loop status`.

Answers are private to the person who asked (the thread a `/loop new` makes is
what everyone sees). Each command is deferred at once, so a slow Loop API never
makes Discord show "The application did not respond".
"""

from __future__ import annotations

import discord
from discord import app_commands

from adapters.actions import Action
from adapters.binding import Binding, ConversationKey
from adapters.conversations import Conversations
from adapters.discord.incoming import PLATFORM, actor_of, conversation_key
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.routing import OptionError, merge
from adapters.starting import NAME_ERRORS, as_made
from bridge.client import LoopApiError

NO_LOOP = "No loop here: mention me in a channel, or start one with `/loop new`."
NOT_ALLOWED = "You are not allowed to start loops here."
TEXT_CHANNELS_ONLY = "Use `/loop new` in a text channel."
NO_MENTIONS = discord.AllowedMentions.none()
THREAD_NAME = 100


class LoopCommands(app_commands.Group):
    def __init__(
        self, conversations: Conversations, settings: DiscordSettings, budget: ChannelBudget
    ) -> None:
        super().__init__(name="loop", description="Agent loops: start one, stop it, see it")
        self.conversations = conversations
        self.bound_channels = frozenset(settings.bound_channels)
        self.archive_minutes = settings.archive_duration
        self.budget = budget

    @app_commands.command(name="new", description="Start a loop in a new thread")
    @app_commands.describe(
        title="What the loop is about (the thread's name)",
        repo="The repository to work on (else the channel's)",
        branch="The branch to work on (made when missing)",
        profiles="Profiles, separated by commas",
        vault="The vault of secrets the agent gets",
        mode="The agent's permission mode",
    )
    async def new(
        self,
        interaction: discord.Interaction,
        title: str | None = None,
        repo: str | None = None,
        branch: str | None = None,
        profiles: str | None = None,
        vault: str | None = None,
        mode: str | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        actor = actor_of(interaction.user)
        channel = interaction.channel
        key = conversation_key(channel, self.bound_channels)
        thread: discord.Thread | None = None
        # The same options as a mention's `repo=…` words (routing.py), checked first.
        given = {
            "repo": repo,
            "branch": branch,
            "profiles": profiles,
            "vault": vault,
            "permission_mode": mode,
        }
        inline = {name: value for name, value in given.items() if value}
        place = (
            str(getattr(channel, "parent_id", None) or getattr(channel, "id", "")),
            str(interaction.guild_id or ""),
        )
        try:
            options = merge(self.conversations.routes.defaults(*place), inline)
        except OptionError as exc:
            await interaction.followup.send(f"No loop was started: {exc}", ephemeral=True)
            return
        if key is None:
            if not isinstance(channel, discord.TextChannel):
                await interaction.followup.send(TEXT_CHANNELS_ONLY, ephemeral=True)
                return
            if not self.conversations.policy.may_send(actor, str(channel.id)):
                await interaction.followup.send(NOT_ALLOWED, ephemeral=True)
                return
            name = (title or "").strip()[:THREAD_NAME] or "loop"
            thread = await channel.create_thread(
                name=name,
                type=discord.ChannelType.public_thread,
                auto_archive_duration=self.archive_minutes,
            )
            key = ConversationKey(PLATFORM, str(channel.guild.id), str(channel.id), str(thread.id))
        elif not self.conversations.policy.may_send(actor, key.channel):
            await interaction.followup.send(NOT_ALLOWED, ephemeral=True)
            return
        bindings = self.conversations.bindings
        try:
            async with bindings.lock(key):
                binding, created = await bindings.find_or_create(
                    key, first_text=title or "", started_by=actor.user_id, options=options
                )
        except LoopApiError as exc:
            if exc.code not in NAME_ERRORS:
                raise
            if thread is not None:
                await thread.delete()
            await interaction.followup.send(f"No loop was started: {exc.message}", ephemeral=True)
            return
        if not created:
            await interaction.followup.send(
                f"This conversation already has loop `{binding.loop_id}`.", ephemeral=True
            )
            return
        if thread is not None:
            async with self.budget.slot(thread.id, "post", live=False):
                summary = as_made(binding, options).summary()
                await thread.send(
                    f"Loop `{binding.loop_id}` started by <@{actor.user_id}>. "
                    + (f"{summary}. " if summary else "")
                    + "Write here: every message in this thread goes to the agent.",
                    allowed_mentions=NO_MENTIONS,
                )
        where = thread.mention if thread is not None else "this conversation"
        await interaction.followup.send(
            f"Started loop `{binding.loop_id}` in {where}.", ephemeral=True
        )

    @app_commands.command(name="stop", description="Stop the loop's running turn")
    async def stop(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        binding = await self._binding(interaction)
        if binding is None:
            await interaction.followup.send(NO_LOOP, ephemeral=True)
            return
        decision = await self.conversations.decide(
            actor_of(interaction.user), Action("stop", binding.loop_id)
        )
        answer = "Stopping the running turn." if decision.outcome == "stopped" else decision.message
        await interaction.followup.send(answer, ephemeral=True)

    @app_commands.command(name="status", description="The loop's id, whether it is busy, its queue")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        binding = await self._binding(interaction)
        if binding is None:
            await interaction.followup.send(NO_LOOP, ephemeral=True)
            return
        try:
            loop = await self.conversations.client.get_loop(binding.loop_id)
        except LoopApiError as exc:
            await interaction.followup.send(
                f"That loop is not available ({exc.code}).", ephemeral=True
            )
            return
        busy = "busy" if loop.busy else "idle"
        await interaction.followup.send(
            f"Loop `{loop.id}` · {discord.utils.escape_markdown(loop.title)}\n"
            f"{busy} · {loop.queue_depth} queued · {loop.turn_count} turns",
            ephemeral=True,
        )

    async def _binding(self, interaction: discord.Interaction) -> Binding | None:
        key = conversation_key(interaction.channel, self.bound_channels)
        return None if key is None else await self.conversations.bindings.find(key)
