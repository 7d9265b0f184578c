"""One active loop in memory: its worker, which runs the queued turns one by one, and the
agent's messages turned into events. The parts it is made of hold the rest: the queue
(core/turn_queue.py), the events and their ids (core/emitter.py), the agent and its
sandbox (core/agent_slot.py), the choices (core/choice_desk.py) and the turns' rows
(core/turn_rows.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    Message,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    StreamEvent,
    ToolPermissionContext,
    ToolResultBlock,
    UserMessage,
)

from bridge.contract.events import (
    AssistantDeltaEvent,
    DoneEvent,
    ErrorEvent,
    EventData,
    FileSharedEvent,
    InterruptedEvent,
    QueuedEvent,
    SnapshotEvent,
    StartedEvent,
    ThinkingDeltaEvent,
    ToolCallEvent,
    ToolResultEvent,
    Trigger,
)
from bridge.contract.models import PermissionMode
from core import agent as sdk
from core import files, logctx, metrics, tool_record, tracing
from core.agent_slot import AgentHooks, AgentSlot
from core.budgets import Refusal
from core.choice_desk import ChoiceDesk
from core.choices import EVICTED, INTERRUPTED, Choice
from core.config import Settings
from core.emitter import Emitter, make_event
from core.errors import EngineError
from core.events import Channel, Event
from core.ids import new_id, utcnow
from core.sandbox import Sandbox
from core.share import SHARE_TOOL
from core.starts import StartGate
from core.storage import Database, EventWriter
from core.tasks import spawn
from core.turn import LoopSpec, Turn
from core.turn_queue import TurnQueue
from core.turn_rows import TurnRows
from core.usage import TOKEN_KINDS, usage_of

__all__ = ["SERVER_STOPPED", "BudgetGate", "Context", "LoopRuntime", "LoopSpec", "Turn"]

log = logging.getLogger(__name__)

SERVER_STOPPED = "the server stopped during this turn"
# An interrupt that the agent does not acknowledge within this time ends the turn anyway.
INTERRUPT_GRACE_SECONDS = 5.0
# One counter child per token kind, looked up once.
TOKEN_COUNTERS = {name: metrics.MODEL_TOKENS.labels(kind) for name, kind in TOKEN_KINDS.items()}
# (API user, author, loop, turn) → the spent budget the turn falls under, or None.
BudgetGate = Callable[[str, str, str, str], Coroutine[Any, Any, Refusal | None]]
Terminal = DoneEvent | InterruptedEvent | ErrorEvent


@dataclass
class Context:
    """What every runtime shares with the engine."""

    settings: Settings
    db: Database
    writer: EventWriter
    sandbox: Sandbox
    agent_env: dict[str, str]
    forget: Callable[[LoopRuntime], None]
    # The bound on agents cold-starting at once on this replica (LOOPBRIDGE_MAX_STARTING).
    starts: StartGate
    # Set when budgets are configured: asked again before a queued turn starts.
    budget_gate: BudgetGate | None = None


class LoopRuntime:
    def __init__(self, ctx: Context, spec: LoopSpec, seq: int, reserved: int) -> None:
        self.ctx = ctx
        self.spec = spec
        self.id = spec.id
        self._background: set[asyncio.Task[Any]] = set()
        self.events = Emitter(spec.id, ctx.db, ctx.writer, seq, reserved, self._later)
        self.queue = TurnQueue()
        self.current: Turn | None = None
        hooks = AgentHooks(self._on_message, self._on_exit, self._can_use_tool, self._share_file)
        self.slot = AgentSlot(
            ctx.settings, ctx.sandbox, ctx.agent_env, spec, hooks, self._later, ctx.starts
        )
        self.choices = ChoiceDesk(
            self.events,
            ctx.settings.sandbox_idle_seconds,
            lambda turn: self._later(self._evict(turn)),
        )
        self.rows = TurnRows(ctx.db, spec)
        # Ended turns whose final row is still being written: history reads them from here.
        self.unsaved: dict[str, Turn] = {}
        self.closed = False
        self.active_at = time.monotonic()  # the last message or turn end: the LRU order of agents
        self._worker = spawn(self._work(), f"loop-{spec.id}")

    # ---- what the engine calls -------------------------------------------------

    @property
    def seq(self) -> int:
        """The id of the newest published event."""
        return self.events.seq

    @property
    def channel(self) -> Channel:
        return self.events.channel

    @property
    def agent(self) -> sdk.AgentSession | None:
        return self.slot.agent

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    @property
    def quiet(self) -> bool:
        """Nothing runs, nobody listens, nothing is being written: safe to drop from memory."""
        return (
            self.slot.agent is None
            and not self.slot.sandbox_held
            and not self.busy
            and not self._background
            and self.channel.subscriber_count == 0
        )

    def new_turn(
        self,
        text: str,
        permission_mode: PermissionMode,
        trigger: Trigger = "message",
        author: dict[str, str] | None = None,
        size: int = 0,
    ) -> Turn:
        self.spec.turn_count += 1
        number = self.spec.turn_count
        return Turn(new_id("turn"), number, trigger, text, permission_mode, author, size)

    def enqueue(self, turn: Turn) -> None:
        self.slot.cancel_idle()
        self.active_at = time.monotonic()
        if self.busy:
            turn.waited = True
            self.events.emit(QueuedEvent(position=len(self.queue) + 1), turn.id)
        self.queue.put(turn)

    def snapshot(self) -> Event | None:
        turn = self.current
        if turn is None or turn.started_at is None:
            return None
        # Text of deltas still held is not "so far": they come after the snapshot.
        held = self.events.held_deltas(turn.id)
        data = SnapshotEvent(
            turn_id=turn.id,
            assistant_text_so_far="".join(turn.text[: len(turn.text) - held]),
            pending_choice_id=turn.pending_choice_id,
        )
        return make_event(data, self.seq, turn.id)

    def answer(
        self,
        choice_id: str,
        body: dict[str, Any],
        source: str,
        by: dict[str, str] | None = None,
    ) -> tuple[Turn, Choice, dict[str, Any]]:
        """Resolve a pending choice; `by` [ext] is the person who answered, when known."""
        return self.choices.answer(self.current, choice_id, body, source, by)

    async def interrupt(self) -> None:
        turn = self.current
        if turn is None or turn.finished.is_set() or turn.interrupt_requested:
            return
        turn.interrupt_requested = True
        self.choices.end(turn, INTERRUPTED)
        agent = self.slot.agent
        if turn.started_at is None or agent is None:
            return  # the worker sees the flag before it sends anything
        with contextlib.suppress(Exception):
            await agent.interrupt()
        self._later(self._interrupt_watchdog(turn))

    async def close(self, archived: bool) -> None:
        """Stop the agent and the worker; a turn still open ends `interrupted` on archive,
        `error` when the server stops."""
        self.closed = True
        self.slot.cancel_idle()
        self.choices.cancel_timer()
        for turn in [*([self.current] if self.current else []), *self.queue]:
            if archived:
                await self._finish(turn, InterruptedEvent(turn_id=turn.id))
            else:
                await self._finish(turn, _error("agent_failed", SERVER_STOPPED, turn.id))
        self.queue.clear()
        self.events.stop()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        await self.slot.stop()
        await self.settle()
        await self.release_ids()

    async def release_ids(self) -> None:
        await self.events.release_ids()

    async def settle(self) -> None:
        """Wait for the writes this runtime started."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def release_agent(self) -> None:
        """Stop this idle loop's agent to make room for another; its next turn resumes it."""
        self.slot.release()

    def dispose(self) -> None:
        self.closed = True
        self.slot.cancel_idle()
        self._worker.cancel()

    # ---- the worker ---------------------------------------------------------------

    async def _work(self) -> None:
        logctx.bind(loop_id=self.id, user=self.spec.owner)
        while True:
            turn = await self.queue.take(lambda: self.current is None)
            self.current = turn
            try:
                await self._run(turn)
            except Exception as exc:  # a bug must cost one turn, never the loop's worker
                log.exception("loop %s: turn %s failed", self.id, turn.id)
                await self._finish(turn, _error("agent_failed", str(exc), turn.id))
            await turn.finished.wait()

    async def _run(self, turn: Turn) -> None:
        gate = self.ctx.budget_gate
        if gate is not None and turn.waited and turn.trigger == "message":
            author = turn.author["id"] if turn.author else self.spec.owner
            refusal = await gate(self.spec.owner, author, self.id, turn.id)
            if refusal is not None:
                await self._finish(turn, _error("budget_exceeded", refusal.message, turn.id))
                return
        try:
            cold = await self.slot.ensure(turn.permission_mode)
        except EngineError as exc:
            await self._finish(turn, _error(exc.code, exc.message, turn.id))
            return
        if turn.interrupt_requested:
            await self._finish(turn, InterruptedEvent(turn_id=turn.id))
            return
        self._begin(turn, cold)
        agent = self.slot.agent
        assert agent is not None
        try:
            await agent.set_permission_mode(turn.permission_mode)
            await agent.query(await self._prompt(turn))
        except Exception as exc:  # the CLI went away between turns
            await self._finish(turn, _error("agent_failed", str(exc), turn.id))
            await self.slot.stop()

    async def _prompt(self, turn: Turn) -> str | list[dict[str, Any]]:
        if not turn.attachments:
            return turn.prompt
        workdir = self.ctx.sandbox.workdir(self.id)
        return await asyncio.to_thread(files.prompt_content, workdir, turn.prompt, turn.attachments)

    def _begin(self, turn: Turn, cold: bool) -> None:
        turn.started_at = utcnow()
        turn.span = tracing.tracer.started(self.id, turn)
        self._bind_log(turn)
        log.info("turn %s of loop %s started (%s)", turn.id, self.id, turn.trigger)
        started = StartedEvent(turn_id=turn.id, cold_start=cold, trigger=turn.trigger)
        self.events.emit(started, turn.id)
        turn.start_saved = self._later(self.rows.save_start(turn))

    async def _finish(self, turn: Turn, terminal: Terminal) -> None:
        if turn.finished.is_set():
            return
        turn.finished.set()
        self.choices.end(turn, INTERRUPTED)
        self.choices.cancel_timer()
        self.events.emit(terminal, turn.id)
        if self.current is turn:
            self.current = None
        self.active_at = time.monotonic()
        match terminal:
            case DoneEvent():
                turn.ended, turn.error = "done", None
            case InterruptedEvent():
                turn.ended, turn.error = "interrupted", None
            case ErrorEvent(code=code, message=message):
                turn.ended, turn.error = "error", {"code": code, "message": message}
        turn.ended_at = utcnow()
        metrics.TURNS.labels(turn.trigger, turn.ended).inc()
        if turn.span is not None:
            tracing.tracer.ended(turn.span, turn)
        self._bind_log(turn)
        if turn.started_at is not None:
            metrics.TURN_DURATION.observe((turn.ended_at - turn.started_at).total_seconds())
        log.info("turn %s of loop %s ended %s", turn.id, self.id, turn.ended)
        self.unsaved[turn.id] = turn
        turn.end_saved = self._later(self._save_end(turn))
        self.queue.wake()
        if not self.queue and not self.closed:
            self.slot.arm_idle(self._idle, lambda: self.ctx.forget(self))

    async def _save_end(self, turn: Turn) -> None:
        await self.rows.save_end(turn)
        self.unsaved.pop(turn.id, None)

    def _idle(self) -> bool:
        return not self.busy and not self.closed

    # ---- the agent's messages -------------------------------------------------------

    async def _on_exit(self, failure: str | None) -> None:
        self.slot.agent = None
        turn = self.current
        if turn is not None and turn.started_at is not None and not turn.ending:
            message = failure or "the agent process ended"
            await self._finish(turn, _error("agent_failed", message, turn.id))

    async def _on_message(self, message: Message) -> None:
        session_id = sdk.session_id_of(message)
        if session_id and session_id != self.spec.session_id:
            self.spec.session_id = session_id
            self._later(self.rows.save_session_id(session_id))
        turn = self._turn_of(message)
        if turn is None:
            return
        match message:
            case StreamEvent():
                self._delta(turn, message)
            case AssistantMessage():
                self._tool_calls(turn, message)
            case UserMessage():
                results = sdk.tool_results(message)
                # The CLI's own account of a tool's run (e.g. an edit's patch), one per result.
                account = message.tool_use_result if len(results) == 1 else None
                for result in results:
                    self._tool_result(turn, result, account)
            case ResultMessage():
                await self._end_with_result(turn, message)

    def _turn_of(self, message: Message) -> Turn | None:
        """The turn a message belongs to: the running one, or a new background turn when
        the agent wakes up by itself; None when the message is to be ignored."""
        turn = self.current
        if turn is not None and turn.ending:
            return None
        if turn is not None and turn.started_at is not None:
            return turn
        if turn is not None or not sdk.starts_activity(message):
            return None
        return self._begin_background()

    def _delta(self, turn: Turn, message: StreamEvent) -> None:
        delta = sdk.stream_delta(message)
        if delta is None:
            return
        kind, text = delta
        event: EventData
        if kind == "assistant":
            if not turn.text and turn.started_at is not None:
                metrics.FIRST_DELTA.observe((utcnow() - turn.started_at).total_seconds())
            turn.text.append(text)
            turn.text_length += len(text)
            event = AssistantDeltaEvent(text=text)
        else:
            event = ThinkingDeltaEvent(text=text)
        self.events.emit(event, turn.id)

    def _tool_calls(self, turn: Turn, message: AssistantMessage) -> None:
        for block in sdk.tool_uses(message):
            if block.id in turn.tool_calls:
                continue
            summary = sdk.summarize_input(block.name, block.input)
            data = {
                "tool_use_id": block.id,
                "tool": block.name,
                "input_summary": summary,
                "input": tool_record.clipped_input(block.input),
            }
            call = {
                **data,
                "ok": None,
                "output": None,
                "diff": None,
                "text_offset": turn.text_length,
            }
            turn.tool_calls[block.id] = call
            turn.tool_inputs[block.id] = block.input
            call["event_id"] = self.events.emit(ToolCallEvent.model_validate(data), turn.id)

    def _tool_result(
        self, turn: Turn, result: ToolResultBlock, account: dict[str, Any] | None
    ) -> None:
        ok = not result.is_error
        data: dict[str, Any] = {
            "tool_use_id": result.tool_use_id,
            "ok": ok,
            "output": tool_record.output_text(result.content),
        }
        call = turn.tool_calls.get(result.tool_use_id)
        if call is not None:
            tool_input = turn.tool_inputs.pop(result.tool_use_id, {})
            diff = tool_record.edit_diff(call["tool"], tool_input, account) if ok else None
            if diff is not None:
                data["diff"] = diff
            call.update(ok=ok, output=data["output"], diff=diff)
        self.events.emit(ToolResultEvent.model_validate(data), turn.id)

    async def _end_with_result(self, turn: Turn, result: ResultMessage) -> None:
        turn.usage = usage = usage_of(result, self.slot.meter)
        self.spec.session_cost = self.slot.meter.base
        metrics.MODEL_COST.inc(usage.cost_usd)
        for name, counter in TOKEN_COUNTERS.items():
            counter.inc(getattr(usage, name))
        if turn.interrupt_requested:
            await self._finish(turn, InterruptedEvent(turn_id=turn.id))
        elif (failure := sdk.result_error(result)) is not None:
            await self._finish(turn, _error("agent_failed", failure, turn.id))
        else:
            done = DoneEvent.model_validate({"turn_id": turn.id, "usage": usage.as_dict()})
            await self._finish(turn, done)

    def _begin_background(self) -> Turn:
        """The agent woke up by itself (e.g. a background command ended): a turn of its own."""
        self.slot.cancel_idle()
        agent = self.slot.agent
        mode = agent.permission_mode if agent else "default"
        turn = self.new_turn("", mode, trigger="background")
        self.current = turn
        self._begin(turn, cold=False)
        return turn

    async def _can_use_tool(
        self, tool: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResultAllow | PermissionResultDeny:
        turn = self.current
        if turn is None or turn.interrupt_requested:
            return PermissionResultDeny(message="No turn is running.", interrupt=True)
        if tool == SHARE_TOOL:  # in case a mode asks anyway: it never needs a person
            return PermissionResultAllow(updated_input=tool_input)
        return await self.choices.ask(turn, tool, tool_input, context.title)

    async def _share_file(self, path: str, caption: str | None) -> str:
        """The agent's share_file: a file of its working directory, given to the people."""
        turn = self.current
        if turn is None or turn.finished.is_set():
            raise ValueError("no turn is running")
        host = self.slot.host
        workdir = self.ctx.sandbox.workdir(self.id)
        insides = [str(workdir), *([host.inside] if host and host.inside else [])]
        try:
            relative = files.agent_relative(path, *insides)
            opened = await asyncio.to_thread(files.open_file, workdir, relative)
        except EngineError as exc:
            raise ValueError(f"cannot share {path}: {exc.message}") from None
        opened.close()
        shared = FileSharedEvent(
            path=opened.path, size=opened.size, media_type=opened.media_type, caption=caption
        )
        turn.files_shared.append(shared.model_dump())
        self.events.emit(shared, turn.id)
        return f"Shared {opened.path} ({opened.size} bytes) with the people in this conversation."

    async def _interrupt_watchdog(self, turn: Turn) -> None:
        try:
            await asyncio.wait_for(turn.finished.wait(), INTERRUPT_GRACE_SECONDS)
        except TimeoutError:
            log.warning("loop %s: the agent ignored an interrupt; restarting it", self.id)
            turn.ending = True
            await self.slot.stop()
            await self._finish(turn, InterruptedEvent(turn_id=turn.id))

    async def _evict(self, turn: Turn) -> None:
        """Nobody answered for the sandbox's idle time: reclaim it, then end the turn, so the
        next turn finds everything stopped and starts afresh."""
        turn.ending = True
        self.choices.end(turn, EVICTED)
        await self.slot.reclaim()
        message = "the sandbox was reclaimed while a choice waited"
        await self._finish(turn, _error("sandbox_evicted", message, turn.id))

    # ---- helpers --------------------------------------------------------------------

    def _bind_log(self, turn: Turn) -> None:
        author = turn.author["id"] if turn.author else self.spec.owner
        logctx.bind(loop_id=self.id, turn_id=turn.id, user=self.spec.owner, author=author)

    def _later(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work off the event path (mostly database writes), tracked until it ends;
        its failure is logged with the loop and the work's name."""
        task = spawn(coro, f"loop {self.id}: {getattr(coro, '__qualname__', 'work')}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _error(code: str, message: str, turn_id: str) -> ErrorEvent:
    return ErrorEvent(code=code, message=message, turn_id=turn_id)
