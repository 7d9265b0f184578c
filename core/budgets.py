"""Budgets: a message may not start a turn while a budget it falls under is spent.

What was spent is summed from the stored usage of ended turns (so budgets hold
across restarts and replicas); a running turn counts once it ends, and is never cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from core.config import Budgets
from core.tables import loops, turns


@dataclass(frozen=True)
class Refusal:
    """A spent budget: which, how much, and when it resets (None: never)."""

    budget: str
    cap: float
    spent: float
    resets_at: datetime | None
    message: str

    def retry_after(self, now: datetime) -> int | None:
        if self.resets_at is None:
            return None
        return max(1, math.ceil((self.resets_at - now).total_seconds()))


def day_window(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def month_window(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


async def check(
    conn: Any, budgets: Budgets, *, user: str, author: str, loop: str, now: datetime
) -> Refusal | None:
    """The spent budget this message falls under, the one that resets last; or None.

    `author` is the message's author id, or the token's user when it names none.
    """
    # Longest first: a loop's budget never resets, a month outlasts a day.
    person = func.coalesce(turns.c.author_id, loops.c.created_by)
    day, month = day_window(now), month_window(now)
    checks: list[tuple[str, float | None, Any, tuple[datetime, datetime] | None, str]] = [
        ("loop_usd", budgets.loop_usd, turns.c.loop_id == loop, None, "this loop's budget"),
        (
            "author_monthly_usd",
            budgets.author_monthly_usd,
            person == author,
            month,
            f"the monthly budget of {author}",
        ),
        (
            "user_monthly_usd",
            budgets.user_monthly_usd,
            loops.c.created_by == user,
            month,
            f"the monthly budget of API user {user}",
        ),
        (
            "author_daily_usd",
            budgets.author_daily_usd,
            person == author,
            day,
            f"the daily budget of {author}",
        ),
        (
            "user_daily_usd",
            budgets.user_daily_usd,
            loops.c.created_by == user,
            day,
            f"the daily budget of API user {user}",
        ),
    ]
    for name, cap, who, window, label in checks:
        if cap is None:
            continue
        query = (
            select(func.coalesce(func.sum(turns.c.cost_usd), 0.0))
            .select_from(turns.join(loops, turns.c.loop_id == loops.c.id))
            .where(who)
        )
        if window is not None:
            query = query.where(turns.c.ended_at >= window[0], turns.c.ended_at < window[1])
        spent = float(await conn.scalar(query) or 0.0)
        if spent >= cap:
            resets_at = window[1] if window is not None else None
            return Refusal(name, cap, spent, resets_at, _message(label, cap, spent, resets_at))
    return None


def _message(label: str, cap: float, spent: float, resets_at: datetime | None) -> str:
    head = f"Budget reached: {label} (${cap:.2f}) is spent (${spent:.4f} used)"
    if resets_at is None:
        return f"{head}; it does not reset (an operator can raise it; a new loop starts afresh)."
    return f"{head}; it resets at {resets_at.strftime('%Y-%m-%d %H:%M')} UTC."
