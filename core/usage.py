"""What turns cost: a turn's own usage from the agent's result, and sums of stored usage.

The agent CLI reports, in each turn's result message, `usage` (the tokens of the API
calls of that query alone) and `total_cost_usd` (the running total of the session:
across the queries of one process, and carried over a resume when the process that
ran before ended cleanly). A turn's own cost is therefore the difference from the
total seen before; `CostMeter` keeps that baseline per agent process. See
docs/operations.md for what was measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from claude_agent_sdk import ResultMessage

# Float dust of the differences is rounded off at this many decimals (a nano-dollar).
COST_DECIMALS = 9
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# The `kind` label of the token counter, per usage field.
TOKEN_KINDS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_creation_input_tokens": "cache_creation",
    "cache_read_input_tokens": "cache_read",
}


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    duration_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Any) -> Usage | None:
        """The usage stored on a turns row; None when none was recorded."""
        if row.cost_usd is None:
            return None
        return cls(
            input_tokens=row.input_tokens or 0,
            output_tokens=row.output_tokens or 0,
            cache_creation_input_tokens=row.cache_creation_input_tokens or 0,
            cache_read_input_tokens=row.cache_read_input_tokens or 0,
            cost_usd=row.cost_usd,
            duration_ms=row.duration_ms or 0,
        )


class CostMeter:
    """Turns the CLI's running cost total into each turn's own cost, for one agent process.

    `base` is the total the process is expected to start from: 0 for a new session,
    the last total seen for a resumed one (the CLI restores it). A total below the
    base means the CLI did not restore it (its previous process did not end cleanly):
    the base is then 0.
    """

    def __init__(self, base: float | None) -> None:
        self.base = base or 0.0

    def turn_cost(self, total: float) -> float:
        base = self.base if total >= self.base else 0.0
        self.base = total
        return round(max(0.0, total - base), COST_DECIMALS)


def usage_of(result: ResultMessage, meter: CostMeter) -> Usage:
    """The turn's own usage from its result message (the meter moves on to its total)."""
    raw = result.usage or {}
    tokens = {name: _count(raw.get(name)) for name in TOKEN_FIELDS}
    cost = meter.turn_cost(float(result.total_cost_usd or 0.0))
    return Usage(**tokens, cost_usd=cost, duration_ms=_count(result.duration_ms))


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


@dataclass
class UsageSum:
    """A sum of usage over turns (no duration: the contract's totals leave it out)."""

    key: str = ""
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, usage: Usage | None) -> None:
        self.turns += 1
        if usage is None:
            return
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_creation_input_tokens += usage.cache_creation_input_tokens
        self.cache_read_input_tokens += usage.cache_read_input_tokens
        self.cost_usd = round(self.cost_usd + usage.cost_usd, COST_DECIMALS)

    def totals(self) -> dict[str, Any]:
        """The loop resource's `usage`: tokens and cost, without key and turn count."""
        fields = asdict(self)
        del fields["key"], fields["turns"]
        return fields

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def group(rows: Iterable[tuple[str, Usage | None]]) -> tuple[list[UsageSum], UsageSum]:
    """Sums per key, in key order, and the total."""
    sums: dict[str, UsageSum] = {}
    total = UsageSum(key="total")
    for key, usage in rows:
        sums.setdefault(key, UsageSum(key=key)).add(usage)
        total.add(usage)
    return [sums[key] for key in sorted(sums)], total


def day_key(at: datetime) -> str:
    return at.date().isoformat()
