"""A scripted stand-in for the Anthropic Messages API that drives the real Claude Code CLI."""

from bridge.standin.server import StandinModel, standin_app

__all__ = ["StandinModel", "standin_app"]
