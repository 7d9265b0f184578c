"""[ext] What the replicas' coordination may answer a request."""

from __future__ import annotations

from core.errors import EngineError


class OwnedElsewhere(EngineError):
    """The loop is run by another live replica, reachable at `url` (the HTTP layer forwards
    the request there; unhandled, it is a 503 `not_ready`)."""

    def __init__(self, loop: str, url: str) -> None:
        super().__init__("not_ready", f"loop {loop} is run by another replica; try again")
        self.loop = loop
        self.url = url


class FencedOut(Exception):
    """This replica's events for these loops were refused: another replica owns them now."""

    def __init__(self, loops: list[str]) -> None:
        super().__init__(f"no longer the owner of {', '.join(loops)}: their events are refused")
        self.loops = loops
