"""What one user, and the whole server, may hold: live agents, queued messages, queued bytes.

A message is admitted or refused (`429 too_many_requests`, with Retry-After) before
anything of it is stored or queued. An agent is what costs (~200 MB each): when a cap on
agents stands in the way, the least recently used idle agent under that cap is stopped to
make room (its loop resumes its session on its next turn); only when every agent under the
cap is busy is the message refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from core.config import Settings
from core.errors import EngineError

if TYPE_CHECKING:
    from core.runtime import LoopRuntime

RETRY_AFTER_SECONDS = 5


class Quotas:
    def __init__(self, settings: Settings, runtimes: Mapping[str, LoopRuntime]) -> None:
        self.settings = settings
        self.runtimes = runtimes  # the engine's active loops, by id
        self._taken: set[Admission] = set()

    def admission(self, user: str, runtime: LoopRuntime, size: int) -> Admission:
        return Admission(self, user, runtime, size)

    def _admit(self, admission: Admission) -> None:
        """Refuse, or make room and count `admission` until its turn is queued."""
        user, target = admission.user, admission.runtime
        settings = self.settings
        others = [a for a in self._taken if a.user == user]
        mine = [rt for rt in self.runtimes.values() if rt.spec.owner == user]
        queued = [turn.size for rt in mine for turn in rt.queue] + [a.size for a in others]
        if len(queued) >= settings.max_queued_per_user:
            _refuse(f"you have {len(queued)} messages waiting, the most allowed; retry later")
        if sum(queued) + admission.size > settings.max_queued_bytes_per_user:
            _refuse("your waiting messages are too large in all; retry later")
        admission.needs_agent = target.agent is None and not target.busy
        if admission.needs_agent:
            reserved = {a.runtime for a in self._taken if a.needs_agent}
            self._make_room(
                target,
                mine,
                {rt for rt in reserved if rt.spec.owner == user},
                settings.max_agents_per_user,
                "you run the most agents allowed per user, all of them busy; retry later",
            )
            self._make_room(
                target,
                list(self.runtimes.values()),
                reserved,
                settings.max_agents,
                "the server runs the most agents it may, all of them busy; retry later",
            )
        self._taken.add(admission)

    def _make_room(
        self,
        target: LoopRuntime,
        pool: Iterable[LoopRuntime],
        reserved: set[LoopRuntime],
        cap: int,
        refusal: str,
    ) -> None:
        live = {rt for rt in pool if rt.agent is not None or rt.busy} | reserved
        live.discard(target)
        over = len(live) + 1 - cap
        if over <= 0:
            return
        idle = sorted(
            (rt for rt in live if rt.agent is not None and not rt.busy and rt not in reserved),
            key=lambda rt: rt.active_at,
        )
        if len(idle) < over:
            _refuse(refusal)
        for runtime in idle[:over]:
            runtime.release_agent()


class Admission:
    """One message on its way in: counted from `take` until `release` (once it is queued)."""

    def __init__(self, quotas: Quotas, user: str, runtime: LoopRuntime, size: int) -> None:
        self.quotas = quotas
        self.user = user
        self.runtime = runtime
        self.size = size
        self.needs_agent = False

    def take(self) -> None:
        self.quotas._admit(self)

    def release(self) -> None:
        self.quotas._taken.discard(self)


def _refuse(message: str) -> None:
    raise EngineError("too_many_requests", message, retry_after=RETRY_AFTER_SECONDS)
