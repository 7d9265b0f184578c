"""Errors the engine raises; the HTTP layer maps each `code` to a status and type."""

from __future__ import annotations


class EngineError(Exception):
    """A refusal the caller can act on, named by a stable machine-readable code."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Seconds until asking again can succeed (a budget's window), when that is known.
        self.retry_after = retry_after


class SettingsError(Exception):
    """A setting that cannot work; the message says what to fix."""
