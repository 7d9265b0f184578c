"""What a button means, encoded in the button itself.

Buttons carry the loop, the choice and the answer, so a click needs no memory
of the adapter: it works after a restart, and on Discord it fits a persistent
`custom_id` (at most 100 characters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Verb = Literal["allow", "deny", "answer", "submit", "stop"]
VERBS: tuple[str, ...] = get_args(Verb)
PREFIX = "lb1"
MAX_LENGTH = 100


@dataclass(frozen=True)
class Action:
    """`answer` carries a question id in `arg`; the label comes from the clicked control."""

    verb: Verb
    loop_id: str
    choice_id: str = ""
    arg: str = ""

    def encode(self) -> str:
        value = ":".join((PREFIX, self.verb, self.loop_id, self.choice_id, self.arg))
        if len(value) > MAX_LENGTH:
            raise ValueError(f"action id longer than {MAX_LENGTH} characters: {value!r}")
        return value

    @classmethod
    def decode(cls, value: str) -> Action | None:
        parts = value.split(":", 4)
        if len(parts) != 5 or parts[0] != PREFIX or parts[1] not in VERBS or not parts[2]:
            return None
        return cls(parts[1], parts[2], parts[3], parts[4])  # type: ignore[arg-type]
