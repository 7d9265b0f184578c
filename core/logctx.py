"""Who and what a log line is about: loop, turn, API user and author, as context variables.

The engine and the HTTP layer set them where they learn them; a log filter copies
them onto every record, so a JSON log line carries them (see bridge/server/logs.py).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

FIELDS = ("loop_id", "turn_id", "user", "author")
_VARS: dict[str, ContextVar[str | None]] = {name: ContextVar(name, default=None) for name in FIELDS}


def bind(**values: str | None) -> None:
    """Set some of the fields for this task (and the tasks it starts from now on)."""
    for name, value in values.items():
        _VARS[name].set(value)


def current() -> dict[str, str]:
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Adds the fields that apply to each record passing through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True
