"""The engine's Prometheus metrics (names as the contract lists them).

Counters move once per turn, never per event; the gauges are read from the
engine's state when scraped, so keeping them costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The `_created` series double every counter's lines for little use.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client's own

# Seconds: a warm first delta is ~50 ms, a cold start ~1 s, a loaded one a few.
FIRST_DELTA_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

TURNS = Counter(
    "loopbridge_turns", "Turns ended, by trigger and how they ended", ["trigger", "ended"]
)
FIRST_DELTA = Histogram(
    "loopbridge_turn_first_delta_seconds",
    "From a turn's start to its first visible text",
    buckets=FIRST_DELTA_BUCKETS,
)
TURN_DURATION = Histogram(
    "loopbridge_turn_duration_seconds", "From a turn's start to its end", buckets=DURATION_BUCKETS
)
AGENTS_RUNNING = Gauge("loopbridge_agents_running", "Agent CLI processes running")
EVENT_STREAMS_OPEN = Gauge(
    "loopbridge_event_streams_open", "Event streams open (POST /messages and GET /events)"
)
CHOICES_PENDING = Gauge("loopbridge_choices_pending", "Choices waiting for a person")
MODEL_COST = Counter("loopbridge_model_cost_usd", "What the model calls cost, in US dollars")
MODEL_TOKENS = Counter("loopbridge_model_tokens", "Model tokens, by kind", ["kind"])
AGENTS_STARTING = Gauge("loopbridge_agents_starting", "Agents cold-starting now")
AGENT_STARTS_WAITING = Gauge(
    "loopbridge_agent_starts_waiting", "Agent cold starts waiting for LOOPBRIDGE_MAX_STARTING"
)
AGENT_STARTS_QUEUED = Counter(
    "loopbridge_agent_starts_queued", "Agent cold starts that had to wait for another to finish"
)
BUDGET_REFUSALS = Counter(
    "loopbridge_budget_refusals", "Messages refused or ended because a budget was spent", ["budget"]
)


def watch_engine(
    agents: Callable[[], int], streams: Callable[[], int], choices: Callable[[], int]
) -> None:
    """Read the gauges from the engine at scrape time (the newest engine in a process)."""
    AGENTS_RUNNING.set_function(agents)
    EVENT_STREAMS_OPEN.set_function(streams)
    CHOICES_PENDING.set_function(choices)
