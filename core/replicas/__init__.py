"""[ext] Several replicas on one PostgreSQL database: one owner per loop, fan-out through
the event log, failover. The design is in docs/deploy.md ("How replicas share the work").

Only the loop's owner (the holder of its lease, core/replicas/lease.py) runs its agent,
numbers its events and turns and writes them. The HTTP layer forwards a command for a
loop owned elsewhere to its owner (bridge/server/forward.py); a watcher on any replica
follows the loop's event log (core/replicas/log.py). An owner that stops renewing its
leases is taken for dead once they expire: the others end its open turns with `error`
and the loop's next message claims it anew, resuming the same agent session from the
shared data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.contract.events import ErrorEvent
from core.active_loops import newest_id
from core.advisory import Leadership, identity_key
from core.errors import EngineError, SettingsError
from core.events import EventStream
from core.replicas import lease
from core.replicas.errors import FencedOut, OwnedElsewhere
from core.replicas.lease import LEASE_SECONDS
from core.replicas.log import LogFollower, notify, snapshot
from core.storage import EventWriter
from core.tasks import spawn

if TYPE_CHECKING:
    from core.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["OwnedElsewhere", "Replicas"]

HEARTBEAT_SECONDS = LEASE_SECONDS / 3
# Survivors look for expired leases this often: a dead owner's turns end within
# LEASE_SECONDS + REAP_SECONDS of its last heartbeat.
REAP_SECONDS = 2.0
STEPPED_DOWN = "another replica runs this loop now"
# The event writer's linger with replicas: readers elsewhere see events once written.
WRITE_LINGER_SECONDS = 0.01


class _Discarded(EventWriter):
    """The writer of a runtime that lost its lease: its events stay out of the log, which
    the new owner numbers on from."""

    def append(self, loop_id: str, seq: int, turn_id: str | None, name: str, data: str) -> None:
        return


class Replicas:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.db = engine.db
        self.me = engine.settings.replica_id
        # The leases this replica holds: loop → epoch.
        self.held: dict[str, int] = {}
        self.log = LogFollower(engine.db)
        self.identity = Leadership(engine.db.engine, identity_key(self.me), f"replica {self.me}")
        self._tasks: list[asyncio.Task[None]] = []
        self._renewed_at = time.monotonic()
        # Claims and heartbeats take turns: a heartbeat giving back an idle loop's lease
        # must not cross a claim that opens the loop again.
        self._leases = asyncio.Lock()

    @property
    def url(self) -> str:
        return self.engine.settings.internal_url or ""

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        # Two processes under one replica id would each take the other's leases for their
        # own: the second one to start is refused (the lock ends with the first's session).
        if not await self.identity.try_acquire():
            await self.identity.release()
            raise SettingsError(
                f"another replica is running with LOOPBRIDGE_REPLICA_ID={self.me}; "
                "give each replica its own id"
            )
        writer = self.engine.writer
        writer.on_insert = self._fence_and_notify
        writer.linger = WRITE_LINGER_SECONDS
        await self.log.start()
        self._renewed_at = time.monotonic()
        self._tasks = [
            spawn(self._every(HEARTBEAT_SECONDS, self._heartbeat), "replicas: heartbeat"),
            spawn(self._every(REAP_SECONDS, self._reap_expired), "replicas: reaper"),
        ]

    async def recover(self) -> None:
        """At start: the loops a former run of this replica left, and those whose lease has
        expired; a live replica's loops are left alone."""
        async with self.db.engine.connect() as conn:
            left = await lease.left_by(conn, self.me)
        for loop in left:
            await self._take_over(loop, only_expired=False)
        await self._reap_expired()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        held, self.held = self.held, {}
        try:
            async with self.db.write() as conn:
                await lease.release(conn, self.me, held)
        except Exception as exc:  # they expire instead
            log.warning("replicas: leases not given back at stop: %s", exc)
        await self.log.close()
        await self.identity.release()

    # ---- ownership -------------------------------------------------------------------------

    async def owner_elsewhere(self, loop: str) -> str | None:
        """The internal URL of the live replica that runs the loop, when it is not this one."""
        async with self.db.engine.connect() as conn:
            found = await lease.read(conn, loop)
        if found is None or found.expired or found.replica_id == self.me:
            return None
        return found.internal_url

    async def claim(self, loop: str) -> None:
        """Make this replica the loop's owner (before its runtime is made here), taking over
        from an owner whose lease expired; `OwnedElsewhere` when a live one holds it."""
        async with self._leases, self.db.write() as conn:
            await lease.lock(conn, loop)
            found = await lease.read(conn, loop)
            if found is not None and not found.expired:
                if found.replica_id != self.me:
                    raise OwnedElsewhere(loop, found.internal_url)
                if self.held.get(loop) == found.epoch:
                    return
            if found is None or found.expired or loop not in self.held:
                await lease.take_over(conn, loop)
            epoch = await lease.write(conn, loop, self.me, self.url, found)
        self.held[loop] = epoch

    async def wait_for_expiry(self, loop: str, url: str) -> None:
        """The owner at `url` does not answer: wait until its lease on the loop expires or
        changes hands (at most a lease's time and a reaper's round)."""
        deadline = time.monotonic() + LEASE_SECONDS + REAP_SECONDS + 1
        while time.monotonic() < deadline:
            if await self.owner_elsewhere(loop) != url:
                return
            await asyncio.sleep(0.25)
        raise EngineError("not_ready", "the replica that runs this loop does not answer")

    # ---- fan-out ---------------------------------------------------------------------------

    async def follow(self, loop: str, last_event_id: int | None) -> EventStream:
        """A watcher of a loop this replica does not run, from the log: like a local watch,
        a snapshot first when a turn runs, or every event after `last_event_id`."""
        async with self.db.engine.connect() as conn:
            if last_event_id is not None:
                newest = await newest_id(conn, loop)
                if last_event_id > newest:
                    raise EngineError(
                        "invalid_last_event_id",
                        f"Last-Event-ID {last_event_id} is ahead of this loop's newest event "
                        f"{newest}",
                    )
                after, start = last_event_id, []
            else:
                after, snap = await snapshot(conn, loop)
                start = [snap] if snap is not None else []
        return EventStream(self.log.stream(loop, after, start))

    def follow_turn(self, loop: str, turn_id: str, after: int) -> EventStream:
        """One turn's events after `after`, through its end, from the log."""
        return EventStream(self.log.turn(loop, after, turn_id))

    async def _fence_and_notify(self, conn: AsyncConnection, loop_ids: list[str]) -> None:
        """In each event insert's transaction: the rows go in only while this replica still
        owns their loops at the epoch it claimed (fencing), and readers everywhere are
        woken once they are in."""
        held = await lease.epochs_held(conn, self.me, loop_ids)
        lost = [loop for loop in loop_ids if held.get(loop) != self.held.get(loop)]
        if lost:
            for loop in lost:
                spawn(self._step_down(loop), f"replicas: step down from {loop}")
            raise FencedOut(lost)
        await notify(conn, loop_ids)

    # ---- heartbeat, fencing, failover -------------------------------------------------------

    async def _every(self, seconds: float, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await work()
            except Exception as exc:  # tried again next round
                log.warning("replicas: %s failed: %s", work.__name__, exc)

    async def _heartbeat(self) -> None:
        """Renew the leases of the loops this replica runs, give back those it dropped, and
        step down from those another replica took over (fenced out)."""
        async with self._leases:
            await self._renew()

    async def _renew(self) -> None:
        active = self.engine.active
        # A loop dropped from memory keeps its lease until its last events are written.
        written = self.engine.writer.behind == 0
        keep = [loop for loop in self.held if active.holds(loop) or not written]
        dropped = {loop: e for loop, e in self.held.items() if loop not in keep}
        if time.monotonic() - self._renewed_at > LEASE_SECONDS:
            # Not renewed in time: another replica may run these loops by now.
            for loop in keep:
                await self._step_down(loop)
            keep = []
        async with self.db.write() as conn:
            await lease.release(conn, self.me, dropped)
            renewed = await lease.renew(conn, self.me, keep)
        self._renewed_at = time.monotonic()
        for loop in dropped:
            self.held.pop(loop, None)
        for loop in keep:
            if renewed.get(loop) != self.held.get(loop):
                await self._step_down(loop)

    async def _step_down(self, loop: str) -> None:
        self.held.pop(loop, None)
        runtime = self.engine.active.runtimes.pop(loop, None)
        if runtime is None:
            return
        log.warning("replicas: loop %s is run by another replica now: stopping here", loop)
        runtime.events.writer = _Discarded(self.db)
        # The new owner ends this runtime's turns in the log and in the history; here they
        # end for this replica's own streams only, and nothing of it is written.
        for turn in [*([runtime.current] if runtime.current else []), *runtime.queue]:
            error = ErrorEvent(code="agent_failed", message=STEPPED_DOWN, turn_id=turn.id)
            runtime.events.emit(error, turn.id)
            turn.finished.set()
        await runtime.close(archived=False)

    async def _reap_expired(self) -> None:
        async with self.db.engine.connect() as conn:
            loops = await lease.expired(conn)
        for loop in loops:
            if loop not in self.held:  # this replica's own: its heartbeat decides
                await self._take_over(loop, only_expired=True)

    async def _take_over(self, loop: str, only_expired: bool) -> None:
        """End a dead owner's open turns and free the loop for the next message."""
        async with self.db.write() as conn:
            await lease.lock(conn, loop)
            found = await lease.read(conn, loop)
            if only_expired and (found is None or not found.expired):
                return  # claimed or taken over meanwhile
            if found is not None and found.replica_id == self.me and loop in self.held:
                return
            await lease.take_over(conn, loop)
            if found is not None:
                await lease.release(conn, found.replica_id, {loop: found.epoch})
        log.info("replicas: took over loop %s from %s", loop, found.replica_id if found else "-")
