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
from collections.abc import Iterator

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from adapters.actions import Action
from adapters.binding import Binding
from adapters.conversations import IncomingMessage, TurnResult
from adapters.discord.access import INTENTS
from adapters.discord.calls import count_calls
from adapters.discord.chat import DiscordChat
from adapters.discord.clicks import OUTCOME_MARKS, Clicks
from adapters.discord.commands import LoopCommands
from adapters.discord.components import interaction_data
from adapters.discord.incoming import PLATFORM, Incoming, incoming
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.discord.thread import DiscordThread, ThreadStart
from adapters.shell import AdapterShell
from adapters.startup import PlatformRefused, PlatformUnreachable, unreachable
from bridge.client import LoopClient

log = logging.getLogger(__name__)

NOT_ALLOWED_REACTION = "🚫"


class DiscordAdapter(AdapterShell):
    """Runs one Discord bot against one Loop API client (`start`, then `stop`)."""

    platform = PLATFORM
    outcome_marks = OUTCOME_MARKS

    def __init__(self, settings: DiscordSettings, client: LoopClient) -> None:
        if settings.token is None:
            raise ValueError("LOOPBRIDGE_DISCORD_TOKEN is not set")
        super().__init__(settings, client)
        self.settings = settings
        self.bot = discord.Client(
            intents=INTENTS,
            guild_ready_timeout=settings.guild_ready_timeout,
            # Nothing here reads old messages back from discord.py's cache.
            max_messages=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.tree = app_commands.CommandTree(self.bot)
        self.budget = ChannelBudget(settings.budget, settings.window)
        # Thread history, files in and out (issue 10): adapters/discord/chat.py.
        self.chat = DiscordChat(
            self.bot, self.budget, settings.thread_archive_minutes, settings.api_url
        )
        self.clicks = Clicks(self.conversations, self.surface)
        self.tree.add_command(LoopCommands(self.conversations, settings, self.budget))
        self.bound_channels = frozenset(settings.bound_channels)
        self._connection: asyncio.Task[None] | None = None
        self.bot.event(self.on_message)
        self.bot.event(self.on_interaction)
        count_calls(self.bot.http)

    # ---- running -------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Log in, register the slash commands, connect, and wait until the guilds are in."""
        if self.settings.api_url:
            discord.http.Route.BASE = self.settings.api_url.rstrip("/")
        if self.settings.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)
        assert self.settings.token is not None
        with _refusals():
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

    async def _serve(self) -> None:
        assert self._connection is not None
        with _refusals():
            await self._connection

    async def _disconnect(self) -> None:
        # Last: the turns in flight edit their messages through the bot until then.
        await self.chat.aclose()
        await self.bot.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection
            self._connection = None

    # ---- events --------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        self.spawn(self._message(message))

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # Slash commands go to the command tree; components come here.
        if self._stopping or interaction.type is not discord.InteractionType.component:
            return
        action = Action.decode(str(interaction_data(interaction).get("custom_id", "")))
        if action is not None:
            self.spawn(self.clicks.handle(interaction, action))

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
        def surface(binding: Binding, message: IncomingMessage) -> DiscordThread:
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


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Discord refusing to let the bot in, or not answering, said in one line."""
    try:
        yield
    except discord.LoginFailure as exc:
        raise PlatformRefused(f"Discord refused LOOPBRIDGE_DISCORD_TOKEN: {exc}") from None
    except discord.PrivilegedIntentsRequired:
        raise PlatformRefused(
            "Discord refused the bot's intents: switch on the Message Content intent "
            "(Developer Portal → Bot → Privileged Gateway Intents)"
        ) from None
    except discord.DiscordServerError as exc:
        raise PlatformUnreachable(f"Discord answered {exc.status}: {exc.text}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise unreachable("Discord", discord.http.Route.BASE, exc) from None
