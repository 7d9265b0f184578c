"""Rendering one turn as live platform messages, within the platform's limits.

The event side (`add_text`, `tool_call`, `choice`, …) only records what
happened; it never waits on the platform, so reading the turn's stream never
stalls. A flusher task makes the platform calls:

- a message is posted as soon as it exists, and edited at most once per
  `edit_interval` (counted from the end of the previous call, so the platform
  never sees two edits closer than that) — except its first words: a message
  that shows no text yet (the turn's placeholder) shows the first text at once,
  and the throttle starts from there;
- when the text outgrows `part_limit`, the part is sealed on a fence-aware
  boundary and the rest continues in a new message;
- a choice seals the current part, so the answer goes on below the buttons;
- on a platform with a budget of posts, a part waits (without holding up the
  rest) while the budget has no free slot, and when the turn ends with more
  parts waiting than the budget lets through at once, they go as one file;
- at the end every message gets one last edit with its full text; a failed
  call is retried with backoff, so the final text is not lost to a hiccup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from adapters.backoff import delay_after, exponential
from adapters.metrics import LagClock
from adapters.split import PartSplitter, stream_safe
from adapters.surface import MessageGone, Surface
from adapters.views import Activity, ChoiceView, MessageView, TurnState

log = logging.getLogger(__name__)

# Backoff after a failed platform call: 1, 2, 4 … seconds, at most 16.
BACKOFF = exponential(1.0, 16.0)
# A message whose calls keep failing is given up after this many tries in a row.
MAX_FAILURES = 8
# Seconds between two looks at a platform's budget while a part waits for a slot.
BUDGET_RECHECK = 0.25
FINAL_STATES: frozenset[TurnState] = frozenset({"done", "interrupted", "error"})


@dataclass
class _Slot:
    """One platform message of the turn: what it should show and what it shows."""

    view: MessageView | ChoiceView
    message_id: str | None = None
    shown: MessageView | ChoiceView | None = None
    ready_at: float = 0.0
    failures: int = 0
    # A choice answered on this platform: the click handler edits its message.
    handed_over: bool = False
    activity: Activity = field(default_factory=Activity)
    # A text message's part once sealed (None while it is the live tail).
    sealed_text: str | None = None
    # The parts this message carries as a file instead (see _attach_waiting).
    attachment: str | None = None

    @property
    def settled(self) -> bool:
        return self.handed_over or self.view == self.shown


@dataclass
class RenderStats:
    posts: int = 0
    edits: int = 0
    failures: int = 0


class TurnRenderer:
    """Shows one turn through a `Surface`; `async with renderer.running():` around use."""

    def __init__(
        self,
        surface: Surface,
        loop_id: str,
        *,
        own_source_prefix: str = "",
        link: str = "",
        clock: Callable[[], float] = time.monotonic,
        platform: str = "",
    ) -> None:
        self.surface = surface
        self.loop_id = loop_id
        self.own_source_prefix = own_source_prefix
        self.link = link  # shown on the turn's first message
        self.clock = clock
        self.stats = RenderStats()
        self.lag = LagClock(platform)
        self.state: TurnState = "running"
        self.note: str | None = None
        self._splitter = PartSplitter(surface.part_limit, surface.measure)
        self._pending = ""
        self._slots: list[_Slot] = []
        # Text slots in order of the splitter's parts; the last may be the tail.
        self._text_slots: list[_Slot] = []
        self._tail: _Slot | None = None
        self._choices: dict[str, _Slot] = {}
        self._tools: dict[str, tuple[_Slot, str, str | None]] = {}
        self._changed = asyncio.Event()
        self._urgent = asyncio.Event()
        self._finished = False
        self._attached = False
        self._new_tail()

    # ---- what happened (never waits) ------------------------------------------------

    def queued(self, position: int) -> None:
        self.state = "queued"
        self.note = f"queued behind {position} message{'s' if position != 1 else ''}"
        self._poke()

    def started(self) -> None:
        self.state = "running"
        self.note = None
        self._poke()

    def add_text(self, text: str) -> None:
        self._pending += text
        self.lag.text_arrived()
        # A message waiting for its first words shows them at once (see _first_words).
        self._poke(urgent=self._tail is not None and not _has_text(self._tail.shown))

    def tool_call(self, tool_use_id: str, tool: str, summary: str | None) -> None:
        self._sync()
        tail = self._tail or self._new_tail()
        tail.activity.started(tool_use_id, tool, summary)
        self._tools[tool_use_id] = (tail, tool, summary)
        self._poke()

    def tool_result(self, tool_use_id: str, ok: bool) -> None:
        found = self._tools.get(tool_use_id)
        if found is not None:
            slot, tool, summary = found
            slot.activity.finished(tool_use_id, tool, summary, ok)
            self._poke()

    def choice(self, view: ChoiceView) -> None:
        """The agent waits: seal the answer so far and show the buttons below it."""
        self._sync()
        part = self._splitter.seal()
        if self._tail is not None:
            self._tail.sealed_text = part or ""
            self._tail = None
        self.state = "waiting"
        slot = _Slot(view)
        self._slots.append(slot)
        self._choices[view.choice_id] = slot
        self._poke(urgent=True)

    def choice_resolved(self, choice_id: str, source: str) -> None:
        slot = self._choices.get(choice_id)
        if slot is None or not isinstance(slot.view, ChoiceView):
            return
        if self.own_source_prefix and source.startswith(self.own_source_prefix):
            # Clicked on this platform: its click handler shows who decided what.
            slot.handed_over = slot.message_id is not None
        if not slot.handed_over:
            slot.view = slot.view.finished("resolved", f"Answered via {source}")
        self.state = "running"
        self._poke(urgent=True)

    def finish(self, state: TurnState, note: str | None = None) -> None:
        self.state = state
        self.note = note
        for slot in self._choices.values():
            if isinstance(slot.view, ChoiceView) and slot.view.state == "pending":
                slot.view = slot.view.finished("cancelled", "No longer needed: the turn ended.")
        if self._tail is None and (state != "done" or not self._text_slots):
            self._new_tail()
        self._finished = True
        self._poke(urgent=True)

    @property
    def text(self) -> str:
        """The whole answer so far, as sent to the platform (parts joined)."""
        return "".join(self._splitter.parts) + self._splitter.tail + self._pending

    # ---- the flusher ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TurnRenderer]:
        """Runs the flusher; on a normal exit waits until every message is final."""
        task = asyncio.create_task(self._flush_loop())
        try:
            yield self
        except Exception as exc:
            # Whatever broke the stream, the text so far still gets its final edit.
            if not self._finished:
                self.finish("error", f"lost the turn's stream: {exc}")
            await task
            raise
        except BaseException:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        if not self._finished:
            self.finish("error", "the turn's stream ended early")
        await task

    async def _flush_loop(self) -> None:
        while True:
            # Cleared before looking, so a change during the calls below is not missed.
            self._changed.clear()
            self._urgent.clear()
            # Read before syncing: once the views include the end, settled means final.
            finished = self._finished
            self._sync()
            next_due = await self._flush_once()
            if finished and all(slot.settled for slot in self._slots):
                await self._close()
                return
            if next_due is None:
                await self._changed.wait()
            else:
                # Text that arrives meanwhile waits for the due time; a choice or the
                # end of the turn may have a message to post at once.
                delay = max(0.0, next_due - self.clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), delay)

    async def _flush_once(self) -> float | None:
        """Makes the calls that are due, in thread order; returns when the next is due."""
        next_due: float | None = None
        for slot in self._slots:
            if slot.settled:
                continue
            now = self.clock()
            if now < slot.ready_at and not _first_words(slot):
                next_due = _earliest(next_due, slot.ready_at)
                if slot.message_id is None:
                    break  # later messages must not be posted before this one
                continue
            view = slot.view
            if self._held_back(slot):
                next_due = _earliest(next_due, now + BUDGET_RECHECK)
                break
            try:
                if slot.message_id is None:
                    slot.message_id = await self._post(view)
                    self.stats.posts += 1
                else:
                    await self._edit(slot.message_id, view)
                    self.stats.edits += 1
            except MessageGone as exc:
                log.info("a message of loop %s is gone: %s", self.loop_id, exc)
                slot.shown = view
                continue
            except Exception as exc:
                self._failed(slot, exc)
                next_due = _earliest(next_due, slot.ready_at)
                if slot.message_id is None:
                    break
                continue
            slot.shown = view
            if slot is self._tail:
                self.lag.shown()
            slot.failures = 0
            slot.ready_at = self.clock() + self.surface.edit_interval
            if not slot.settled:
                next_due = _earliest(next_due, slot.ready_at)
        return next_due

    def _held_back(self, slot: _Slot) -> bool:
        """A part of a turn still going waits for a free slot instead of queueing for one,
        so the renderer sees the end of the turn in time to send the rest as a file."""
        return (
            slot.message_id is None
            and isinstance(slot.view, MessageView)
            and not self._finished
            and self.surface.posts_free() == 0
        )

    async def _post(self, view: MessageView | ChoiceView) -> str:
        if isinstance(view, ChoiceView):
            return await self.surface.post_choice(view)
        return await self.surface.post(view)

    async def _edit(self, message_id: str, view: MessageView | ChoiceView) -> None:
        if isinstance(view, ChoiceView):
            await self.surface.edit_choice(message_id, view)
        else:
            await self.surface.edit(message_id, view)

    def _failed(self, slot: _Slot, exc: Exception) -> None:
        self.stats.failures += 1
        slot.failures += 1
        if slot.failures >= MAX_FAILURES:
            log.error(
                "giving up on a message of loop %s after %d tries: %s",
                self.loop_id,
                slot.failures,
                exc,
            )
            slot.shown = slot.view
            return
        backoff = delay_after(BACKOFF, slot.failures)
        log.warning(
            "platform call failed (try %d, again in %.0f s): %s", slot.failures, backoff, exc
        )
        slot.ready_at = self.clock() + backoff

    async def _close(self) -> None:
        try:
            await self.surface.close(self.state)
        except Exception as exc:
            log.warning("closing the turn's messages failed: %s", exc)

    # ---- keeping views up to date ----------------------------------------------------

    def _poke(self, urgent: bool = False) -> None:
        self._changed.set()
        if urgent:
            self._urgent.set()

    def _new_tail(self) -> _Slot:
        slot = _Slot(MessageView(self.loop_id))
        self._slots.append(slot)
        self._text_slots.append(slot)
        self._tail = slot
        return slot

    def _kept(self) -> int:
        """How much of the tail an append-only surface already shows."""
        tail = self._tail
        if not self.surface.append_only or tail is None:
            return 0
        return len(tail.shown.text) if isinstance(tail.shown, MessageView) else 0

    def _sync(self) -> None:
        """Feeds new text to the splitter and brings every text view up to date."""
        if self._pending:
            if self._tail is None and self._pending.strip():
                self._new_tail()
            text, self._pending = self._pending, ""
            for part in self._splitter.feed(text, keep=self._kept()):
                if self._tail is not None:
                    self._tail.sealed_text = part
                self._new_tail()
        if self._finished and not self._attached:
            self._attached = True
            self._attach_waiting()
        last = self._text_slots[-1] if self._text_slots else None
        first = self._text_slots[0] if self._text_slots else None
        for slot in self._text_slots:
            is_tail = slot is self._tail
            if slot.attachment is not None:
                text, closing = "", ""
            elif slot.sealed_text is not None:
                text, closing = slot.sealed_text, ""
            else:
                text, closing = self._splitter.tail, self._splitter.tail_closing()
            # The last message carries how the turn ended; sealed ones are complete.
            ends_turn = is_tail or (slot is last and self._finished)
            state: TurnState = self.state if ends_turn else "done"
            if state == "waiting":
                state = "running"
            if is_tail and self.surface.append_only and state in ("queued", "running"):
                # A stream gets only what can never need taking back (see stream_safe).
                text, closing = stream_safe(text), ""
            activity, hidden = slot.activity.shown()
            slot.view = MessageView(
                self.loop_id,
                text=text,
                closing=closing,
                activity=activity,
                hidden_activity=hidden,
                state=state,
                stop=is_tail and state in ("queued", "running"),
                note=self.note if (is_tail or slot is last) and state != "done" else None,
                attachment=slot.attachment or "",
                link=self.link if slot is first else "",
            )

    def _attach_waiting(self) -> None:
        """The parts at the end not posted yet, when more than the budget lets through
        now (and the slot held back for the end), become one file."""
        free = self.surface.posts_free()
        waiting: list[_Slot] = []
        for slot in reversed(self._slots):
            if slot.message_id is not None or slot not in self._text_slots:
                break
            waiting.insert(0, slot)
        if free is None or len(waiting) <= free + 1:
            return
        first = waiting[0]
        first.attachment = "".join(
            self._splitter.tail if slot.sealed_text is None else slot.sealed_text
            for slot in waiting
        )
        for slot in waiting[1:]:
            self._slots.remove(slot)
            self._text_slots.remove(slot)
        self._tail = first if self._tail in waiting else self._tail


def _has_text(view: MessageView | ChoiceView | None) -> bool:
    return isinstance(view, MessageView) and bool(view.text)


def _first_words(slot: _Slot) -> bool:
    """A posted message that shows no text yet now has some: it is not held for the
    edit interval (a failed call still waits out its backoff)."""
    return (
        slot.message_id is not None
        and slot.failures == 0
        and _has_text(slot.view)
        and not _has_text(slot.shown)
    )


def _earliest(current: float | None, candidate: float) -> float:
    return candidate if current is None else min(current, candidate)
