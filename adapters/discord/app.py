"""The Discord adapter: a discord.py client whose messages become loop turns.

- A mention in a text channel starts a thread on that message and a loop bound
  to it; messages in a bound thread go to the loop without a mention; a DM
  channel is one loop; settings may bind a whole channel to one loop. Bots, this
  one included, are ignored.
- Clicks on the adapter's controls are answered at once and carried out after;
  slash commands are `/loop new|stop|status`.

Everything platform-neutral (binding, policy, rendering, idempotency) lives in
`adapters.conversations`; this module only wires Discord to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from adapters.actions import Action
from adapters.binding import Binding
from adapters.conversations import Conversations, IncomingMessage, TurnResult
from adapters.discord.access import INTENTS
from adapters.discord.calls import count_calls
from adapters.discord.chat import DiscordChat
from adapters.discord.clicks import Clicks
from adapters.discord.commands import LoopCommands
from adapters.discord.follow import Followers
from adapters.discord.incoming import PLATFORM, Incoming, incoming
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.discord.thread import DiscordThread, ThreadStart
from adapters.routing import Routes
from adapters.tasks import HandlerTasks
from bridge.client import LoopClient

log = logging.getLogger(__name__)

NOT_ALLOWED_REACTION = "🚫"
STOP_GRACE = 5.0


class DiscordAdapter:
    """Runs one Discord bot against one Loop API client (`start`, then `stop`)."""

    def __init__(self, settings: DiscordSettings, client: LoopClient) -> None:
        if settings.token is None:
            raise ValueError("LOOPBRIDGE_DISCORD_TOKEN is not set")
        self.settings = settings
        self.client = client
        self.bot = discord.Client(
            intents=INTENTS,
            guild_ready_timeout=settings.guild_ready_timeout,
            # Nothing here reads old messages back from discord.py's cache.
            max_messages=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.tree = app_commands.CommandTree(self.bot)
        self.conversations = Conversations(
            client, settings.policy(), platform=PLATFORM, permission_mode=settings.permission_mode,
            routes=Routes.load(PLATFORM),
        )
        self.budget = ChannelBudget(settings.budget, settings.window)
        # Thread history, files in and out (issue 10): adapters/discord/chat.py.
        self.chat = DiscordChat(
            self.bot, self.budget, settings.thread_archive_minutes, settings.api_url
        )
        self.followers = Followers(client, PLATFORM)
        self.clicks = Clicks(self.conversations, self.followers, self.surface)
        # A click on a background turn's choice needs no follower of its own either.
        self.conversations.background.showing = self.followers.showing
        self.tree.add_command(LoopCommands(self.conversations, settings, self.budget))
        self.bound_channels = frozenset(settings.bound_channels)
        self.results: list[TurnResult] = []
        self._tasks = HandlerTasks(log, "Discord")
        self._stopping = False
        self._connection: asyncio.Task[None] | None = None
        self.bot.event(self.on_message)
        self.bot.event(self.on_interaction)
        count_calls(self.bot.http)

    # ---- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, register the slash commands, connect, and wait until the guilds are in."""
        if self.settings.api_url:
            discord.http.Route.BASE = self.settings.api_url.rstrip("/")
        if self.settings.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)
        assert self.settings.token is not None
        await self.bot.login(self.settings.token.get_secret_value())
        if self.settings.sync_commands:
            await self._sync_commands()
        self._connection = asyncio.create_task(self.bot.connect(reconnect=True))
        ready = asyncio.create_task(self.bot.wait_until_ready())
        await asyncio.wait({self._connection, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._connection  # it ended before ready: raise why
        assert self.bot.user is not None
        log.info("Discord adapter connected as %s (%s)", self.bot.user, self.bot.user.id)

    async def _sync_commands(self) -> None:
        guilds = [discord.Object(int(guild)) for guild in self.settings.command_guilds]
        if not guilds:
            await self.tree.sync()
        for guild in guilds:
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop taking events, let turns in flight finish (up to `grace` s), disconnect."""
        self._stopping = True
        await self._tasks.drain(grace)
        await self.conversations.close()
        await self.chat.aclose()
        await self.bot.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection
            self._connection = None

    async def run_forever(self) -> None:
        try:
            await self.start()
            assert self._connection is not None
            await self._connection
        finally:
            await self.stop()

    async def idle(self) -> None:
        """Wait until no message or click is being handled (tests, shutdown)."""
        await self._tasks.idle()

    # ---- events --------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if not self._stopping:
            self._tasks.spawn(self._message(message))

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # Slash commands go to the command tree; components come here.
        if self._stopping or interaction.type is not discord.InteractionType.component:
            return
        action = Action.decode(str((interaction.data or {}).get("custom_id", "")))
        if action is not None:
            self._tasks.spawn(self.clicks.handle(interaction, action))

    async def _message(self, message: discord.Message) -> None:
        found = await incoming(self.bot, message, self.bound_channels)
        if found is None:
            return
        found = self.chat.enrich(found, message)  # files, thread extras
        result = await self._turn(found)
        self.results.append(result)
        person = found.message
        if result.handled == "not_allowed" and (person.mentioned or person.direct):
            with contextlib.suppress(discord.HTTPException):
                await message.add_reaction(NOT_ALLOWED_REACTION)
        elif result.handled == "refused":
            # A spent budget: a reply to the person's message says which, and when it resets.
            with contextlib.suppress(discord.HTTPException):
                await message.reply(result.text, mention_author=False)

    async def _turn(self, found: Incoming) -> TurnResult:
        # While the turn renders here, its loop is marked shown: a click on one of its
        # choices then needs no follower (see follow.py).
        with contextlib.ExitStack() as showing:

            def surface(binding: Binding, message: IncomingMessage) -> DiscordThread:
                showing.enter_context(self.followers.showing(binding.loop_id))
                return self.surface(int(message.key.thread), found.start)

            # A background turn goes to the conversation itself (a thread exists by then).
            channel_id = int(found.message.key.thread)
            return await self.conversations.handle(
                found.message, surface, background=lambda _: self.surface(channel_id)
            )

    def surface(self, channel_id: int, start: ThreadStart | None = None) -> DiscordThread:
        """Where a turn is shown: a channel, or a thread still to be started."""
        return DiscordThread(
            self.bot, self.budget, self.settings, channel_id=channel_id, start=start
        )
