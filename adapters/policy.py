"""Who may do what: start loops, and decide choices (approve tools, answer, stop)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Actor:
    """A platform user, with the groups the platform puts them in (Discord roles)."""

    user_id: str
    roles: frozenset[str] = field(default_factory=frozenset)
    name: str = ""  # as the platform shows them; "" when it did not say

    @property
    def ids(self) -> frozenset[str]:
        return self.roles | {self.user_id}


class Policy:
    """Empty `channels` / `users` mean everyone; ids may name users or roles.

    A choice may be decided by the person who started the conversation, by an
    admin, and by anyone listed in `approvers`.
    """

    def __init__(
        self,
        *,
        channels: Iterable[str] = (),
        users: Iterable[str] = (),
        admins: Iterable[str] = (),
        approvers: Iterable[str] = (),
    ) -> None:
        self.channels = frozenset(channels)
        self.users = frozenset(users)
        self.admins = frozenset(admins)
        self.approvers = frozenset(approvers)

    def may_send(self, actor: Actor, channel: str) -> bool:
        """May this person start a loop here, or write to one (which runs the agent)?"""
        if self.channels and channel not in self.channels:
            return False
        return not self.users or bool(self.users & actor.ids) or self.is_admin(actor)

    def may_decide(self, actor: Actor, started_by: str | None) -> bool:
        if started_by is not None and actor.user_id == started_by:
            return True
        return self.is_admin(actor) or bool(self.approvers & actor.ids)

    def is_admin(self, actor: Actor) -> bool:
        return bool(self.admins & actor.ids)
