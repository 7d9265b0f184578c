"""[ext] Loop leases: which replica owns a loop, claimed, renewed and taken over atomically.

One row per active loop (`loop_leases`): the owner's replica id and internal URL, an
epoch that grows at each change of owner, and an expiry the owner's heartbeat pushes
on. Every change of a loop's lease happens in a transaction that holds the loop's
advisory lock, so two replicas never both claim or take over the same loop. Expiry is
judged by the database's clock, never by the replicas' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.recovery import end_open_turns
from core.replicas.log import notify
from core.tables import loop_leases, loops, turns

# An owner that has not renewed its lease for this long is taken for dead.
LEASE_SECONDS = 6.0
LEASE = timedelta(seconds=LEASE_SECONDS)
LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:key))")


@dataclass(frozen=True)
class Lease:
    replica_id: str
    internal_url: str
    epoch: int
    expired: bool


async def lock(conn: AsyncConnection, loop: str) -> None:
    """The loop's lease lock, until the transaction ends."""
    await conn.execute(LOCK, {"key": f"loopbridge lease {loop}"})


async def read(conn: AsyncConnection, loop: str) -> Lease | None:
    row = (
        await conn.execute(
            select(
                loop_leases.c.replica_id,
                loop_leases.c.internal_url,
                loop_leases.c.epoch,
                (loop_leases.c.expires_at < func.now()).label("expired"),
            ).where(loop_leases.c.loop_id == loop)
        )
    ).first()
    if row is None:
        return None
    return Lease(row.replica_id, row.internal_url, row.epoch, bool(row.expired))


async def write(
    conn: AsyncConnection, loop: str, replica: str, url: str, previous: Lease | None
) -> int:
    """Make `replica` the loop's owner; the new epoch."""
    epoch = previous.epoch + 1 if previous is not None else 1
    values = {
        "replica_id": replica,
        "internal_url": url,
        "epoch": epoch,
        "expires_at": func.now() + LEASE,
    }
    upsert = insert(loop_leases).values(loop_id=loop, **values)
    await conn.execute(upsert.on_conflict_do_update(index_elements=["loop_id"], set_=values))
    return epoch


async def take_over(conn: AsyncConnection, loop: str) -> None:
    """The loop's owner is gone: its open turns end with `error` (`agent_failed`) for every
    reader of the log, and numbering of turns goes on above those it made."""
    await end_open_turns(conn, loop)
    highest = select(func.coalesce(func.max(turns.c.number), 0)).where(turns.c.loop_id == loop)
    await conn.execute(
        update(loops)
        .where(loops.c.id == loop)
        .values(turn_count=func.greatest(loops.c.turn_count, highest.scalar_subquery()))
    )
    await notify(conn, [loop])


async def renew(conn: AsyncConnection, replica: str, loop_ids: list[str]) -> dict[str, int]:
    """Push on the expiry of these leases while they are still this replica's; the epoch of
    each one renewed (a loop missing from the answer was taken over)."""
    if not loop_ids:
        return {}
    query = (
        update(loop_leases)
        .where(loop_leases.c.replica_id == replica, loop_leases.c.loop_id.in_(loop_ids))
        .values(expires_at=func.now() + LEASE)
        .returning(loop_leases.c.loop_id, loop_leases.c.epoch)
    )
    return {row.loop_id: row.epoch for row in (await conn.execute(query)).all()}


async def release(conn: AsyncConnection, replica: str, held: dict[str, int]) -> None:
    """Give up these leases, each only if it is still this replica's at that epoch."""
    for loop, epoch in held.items():
        await conn.execute(
            delete(loop_leases).where(
                loop_leases.c.loop_id == loop,
                loop_leases.c.replica_id == replica,
                loop_leases.c.epoch == epoch,
            )
        )


async def epochs_held(conn: AsyncConnection, replica: str, loop_ids: list[str]) -> dict[str, int]:
    """The epochs of these loops' leases that `replica` holds, locked until the transaction
    ends: a take-over waits for it (its events cannot slip in after the new owner's)."""
    query = (
        select(loop_leases.c.loop_id, loop_leases.c.epoch)
        .where(loop_leases.c.loop_id.in_(loop_ids), loop_leases.c.replica_id == replica)
        .with_for_update(read=True)
    )
    return {row.loop_id: row.epoch for row in (await conn.execute(query)).all()}


async def expired(conn: AsyncConnection) -> list[str]:
    query = select(loop_leases.c.loop_id).where(loop_leases.c.expires_at < func.now())
    rows = await conn.execute(query)
    return [row.loop_id for row in rows]


async def left_by(conn: AsyncConnection, replica: str) -> list[str]:
    """Loops a former run of this replica left: leases under its id, and open turns of
    loops that nobody leases (a single process that stopped before replicas ran)."""
    query = select(loop_leases.c.loop_id).where(loop_leases.c.replica_id == replica)
    mine = (await conn.execute(query)).all()
    leased = select(loop_leases.c.loop_id)
    orphans = (
        await conn.execute(
            select(turns.c.loop_id)
            .where(turns.c.ended.in_(("queued", "running")), turns.c.loop_id.not_in(leased))
            .distinct()
        )
    ).all()
    return sorted({row.loop_id for row in [*mine, *orphans]})
