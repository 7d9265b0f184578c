"""The Slack adapter (slack-bolt, Socket Mode or HTTP Events API)."""

from adapters.slack.app import SlackAdapter
from adapters.slack.settings import SlackSettings

__all__ = ["SlackAdapter", "SlackSettings"]
