"""The Discord adapter (discord.py: gateway events, REST, components, slash commands)."""

from adapters.discord.app import DiscordAdapter
from adapters.discord.settings import DiscordSettings

__all__ = ["DiscordAdapter", "DiscordSettings"]
