"""Errors the engine raises; the HTTP layer maps each `code` to a status and type."""

from __future__ import annotations


class EngineError(Exception):
    """A refusal the caller can act on, named by a stable machine-readable code."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, for refusals that pass with time


class SettingsError(Exception):
    """A setting that cannot work; the message says what to fix."""
