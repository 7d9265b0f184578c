"""One active loop in memory: its queue of turns, its agent, its choices and its events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    Message,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    StreamEvent,
    ToolPermissionContext,
    ToolResultBlock,
    UserMessage,
)
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from core import agent as sdk
from core import files, logctx, metrics, tool_record, tracing
from core.budgets import Refusal
from core.choices import EVICTED, INTERRUPTED, Choice, decision, make_choice, validate_answer
from core.config import Settings
from core.errors import EngineError
from core.events import Channel, Event
from core.ids import new_id, utcnow
from core.sandbox import AgentHost, Sandbox, SandboxSpec
from core.share import SERVER as SHARE_SERVER
from core.share import SHARE_TOOL, share_server
from core.starts import StartGate
from core.storage import TRANSIENT, Database, EventWriter
from core.tables import loops, turns
from core.tasks import spawn
from core.usage import TOKEN_KINDS, CostMeter, Usage, usage_of

log = logging.getLogger(__name__)

SERVER_STOPPED = "the server stopped during this turn"
# An interrupt that the agent does not acknowledge within this time ends the turn anyway.
INTERRUPT_GRACE_SECONDS = 5.0
# Event ids are reserved in the database this many at a time, before any of them is
# published (more are asked for at half-way): after a crash, numbering resumes above the
# reservation, so no id a watcher has seen is ever handed out again.
RESERVE_IDS = 1000
# One counter child per token kind, looked up once.
TOKEN_COUNTERS = {name: metrics.MODEL_TOKENS.labels(kind) for name, kind in TOKEN_KINDS.items()}
# (API user, author, loop, turn) → the spent budget the turn falls under, or None.
BudgetGate = Callable[[str, str, str, str], Awaitable[Refusal | None]]


@dataclass
class Context:
    """What every runtime shares with the engine."""

    settings: Settings
    db: Database
    writer: EventWriter
    sandbox: Sandbox
    agent_env: dict[str, str]
    forget: Callable[[LoopRuntime], None]
    # The engine's bound on agents cold-starting at once (LOOPBRIDGE_MAX_STARTING).
    starts: StartGate
    # Set when budgets are configured: asked again before a queued turn starts.
    budget_gate: BudgetGate | None = None


@dataclass
class Turn:
    id: str
    number: int
    trigger: str
    user_text: str
    permission_mode: str
    # The person the caller speaks for ({"id", "name"}), told to the agent; None: the caller.
    author: dict[str, str] | None = None
    size: int = 0  # bytes of user_text, for the caps on queued messages
    text: list[str] = field(default_factory=list)
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The full input of tool calls still running, for the diff of an edit.
    tool_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_length: int = 0
    # Where each choice was asked: its event's id and how much text came before it.
    choice_marks: dict[str, dict[str, int]] = field(default_factory=dict)
    choices: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, str]] = field(default_factory=list)
    files_shared: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Choice] = field(default_factory=dict)
    started_at: datetime | None = None
    ended: str | None = None
    error: dict[str, str] | None = None
    ended_at: datetime | None = None
    usage: Usage | None = None
    span: Any = None  # the turn's trace span, when tracing is on (core/tracing.py)
    # It waited behind another turn: its budgets are checked again before it starts.
    waited: bool = False
    interrupt_requested: bool = False
    # Set when the engine, not the agent, ends the turn: the agent's last words are ignored.
    ending: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    start_saved: asyncio.Task[None] | None = None
    end_saved: asyncio.Task[None] | None = None

    @property
    def pending_choice_id(self) -> str | None:
        return next(iter(self.pending), None)

    @property
    def prompt(self) -> str:
        """What the agent reads: who wrote the message, when the caller said, then the text."""
        if self.author is None:
            return self.user_text
        return f"{attribution(self.author)}\n{self.user_text}"

    @property
    def pending_choice(self) -> dict[str, Any] | None:
        """The choice the turn waits on, as its `requires_choice` event told it."""
        choice = next((c for c in self.pending.values() if c.pending), None)
        if choice is None:
            return None
        return {"choice_id": choice.id, "kind": choice.kind, "payload": choice.payload}

    def new_row(self, loop_id: str, ended: str) -> dict[str, Any]:
        """The turns-table row of a turn that has just begun or been queued."""
        return {
            "id": self.id,
            "loop_id": loop_id,
            "number": self.number,
            "trigger": self.trigger,
            "user_text": self.user_text,
            "permission_mode": self.permission_mode,
            "author_id": self.author["id"] if self.author else None,
            "author_name": self.author["name"] if self.author else None,
            "ended": ended,
            "started_at": self.started_at,
            "attachments": self.attachments,
            **self.history_fields(),
        }

    def history_fields(self) -> dict[str, Any]:
        return {
            "assistant_text": "".join(self.text),
            "tool_calls": list(self.tool_calls.values()),
            "choices": self.choices,
            "files_shared": self.files_shared,
        }


@dataclass
class LoopSpec:
    """The stored facts of a loop that its runtime needs."""

    id: str
    owner: str
    archived: bool
    session_id: str | None
    turn_count: int
    profiles: list[str]
    vault: str
    repo: str | None
    branch: str | None = None
    # The agent CLI's running cost total of the session, as last reported.
    session_cost: float | None = None


class LoopRuntime:
    def __init__(self, ctx: Context, spec: LoopSpec, seq: int, reserved: int) -> None:
        self.ctx = ctx
        self.spec = spec
        self.id = spec.id
        self.seq = seq  # the id of the newest published event
        self.reserved = reserved  # ids up to here are reserved in the database
        # Events waiting for ids to be reserved (only when the database lags far behind).
        self._held: list[tuple[str, dict[str, Any], str | None]] = []
        self._reserving: asyncio.Task[None] | None = None
        self.channel = Channel()
        self.queue: deque[Turn] = deque()
        self.current: Turn | None = None
        self.agent: sdk.AgentSession | None = None
        self.host: AgentHost | None = None
        self.meter = CostMeter(spec.session_cost)
        self._changed = asyncio.Condition()
        self._worker = spawn(self._work(), f"loop-{spec.id}")
        self._idle_timers: list[asyncio.TimerHandle] = []
        self._evict_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Ended turns whose final row is still being written: history reads them from here.
        self.unsaved: dict[str, Turn] = {}
        self.sandbox_held = False
        self.closed = False
        self.active_at = time.monotonic()  # the last message or turn end: the LRU order of agents

    # ---- what the engine calls -------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    def new_turn(
        self,
        text: str,
        permission_mode: str,
        trigger: str = "message",
        author: dict[str, str] | None = None,
        size: int = 0,
    ) -> Turn:
        self.spec.turn_count += 1
        number = self.spec.turn_count
        return Turn(new_id("turn"), number, trigger, text, permission_mode, author, size)

    def enqueue(self, turn: Turn) -> None:
        self._cancel_idle()
        self.active_at = time.monotonic()
        if self.busy:
            turn.waited = True
            self.emit("queued", {"position": len(self.queue) + 1}, turn.id)
        self.queue.append(turn)
        self._notify()

    def snapshot(self) -> Event | None:
        turn = self.current
        if turn is None or turn.started_at is None:
            return None
        # Text of deltas still held is not "so far": they come after the snapshot.
        held = sum(1 for name, _, t in self._held if name == "assistant_delta" and t == turn.id)
        data = {
            "turn_id": turn.id,
            "assistant_text_so_far": "".join(turn.text[: len(turn.text) - held]),
            "pending_choice_id": turn.pending_choice_id,
        }
        return Event.make("snapshot", data, self.seq, turn.id)

    def answer(
        self,
        choice_id: str,
        body: dict[str, Any],
        source: str,
        by: dict[str, str] | None = None,
    ) -> tuple[Turn, Choice, dict[str, Any]]:
        """Resolve a pending choice; `by` [ext] is the person who answered, when known."""
        turn = self.current
        choice = turn.pending.get(choice_id) if turn else None
        if turn is None or choice is None or not choice.pending:
            raise EngineError("choice_not_found", f"no pending choice {choice_id}")
        answer = validate_answer(choice, body)
        record = {
            "choice_id": choice.id,
            "kind": choice.kind,
            "answer": answer,
            "source": source,
            "payload": tool_record.clipped_input(choice.payload),
            **turn.choice_marks.pop(choice.id, {}),
        }
        if by is not None:
            record["by"] = by
        turn.choices.append(record)
        del turn.pending[choice_id]
        self._cancel_evict()
        self.emit("choice_resolved", {"choice_id": choice_id, "source": source}, turn.id)
        choice.future.set_result(answer)
        return turn, choice, answer

    async def interrupt(self) -> None:
        turn = self.current
        if turn is None or turn.finished.is_set() or turn.interrupt_requested:
            return
        turn.interrupt_requested = True
        self._end_choices(turn, INTERRUPTED)
        if turn.started_at is None or self.agent is None:
            return  # the worker sees the flag before it sends anything
        with contextlib.suppress(Exception):
            await self.agent.interrupt()
        self._later(self._interrupt_watchdog(turn))

    async def close(self, archived: bool) -> None:
        """Stop the agent and the worker; a turn still open ends `interrupted` on archive,
        `error` when the server stops."""
        self.closed = True
        self._cancel_idle()
        self._cancel_evict()
        for turn in [*([self.current] if self.current else []), *self.queue]:
            if archived:
                await self._finish(turn, "interrupted", {"turn_id": turn.id})
            else:
                await self._finish(turn, "error", _error("agent_failed", SERVER_STOPPED, turn.id))
        self.queue.clear()
        if self._reserving is not None:
            self._reserving.cancel()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        await self._stop_agent()
        await self.settle()
        await self.release_ids()

    async def release_ids(self) -> None:
        """Give back the reserved ids no event took, so a clean stop leaves no gap in the ids.
        Only while the reservation is still this runtime's (a newer runtime may hold more)."""
        if self._held or self.reserved == self.seq:
            return
        mine = (loops.c.id == self.id) & (loops.c.event_id_reserved == self.reserved)
        try:
            async with self.ctx.db.write() as conn:
                await conn.execute(update(loops).where(mine).values(event_id_reserved=self.seq))
        except Exception as exc:  # the reservation stands: ids jump, none is reused
            log.warning("loop %s: unused event ids were not given back: %s", self.id, exc)
            return
        self.reserved = self.seq

    async def settle(self) -> None:
        """Wait for the writes this runtime started."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @property
    def quiet(self) -> bool:
        """Nothing runs, nobody listens, nothing is being written: safe to drop from memory."""
        return (
            self.agent is None
            and not self.sandbox_held
            and not self.busy
            and not self._background
            and self.channel.subscriber_count == 0
        )

    def release_agent(self) -> None:
        """Stop this idle loop's agent to make room for another; its next turn resumes it."""
        session, self.agent = self.agent, None
        if session is not None:
            self._later(session.stop())

    def dispose(self) -> None:
        self.closed = True
        self._cancel_idle()
        self._worker.cancel()

    # ---- events -------------------------------------------------------------------

    def emit(self, name: str, data: dict[str, Any], turn_id: str | None) -> int:
        """Publish an event (or hold it until its id is reserved); the id it gets."""
        event_id = self.seq + len(self._held) + 1
        if self._reserving is None and self.seq + len(self._held) >= self._reserve_at:
            self._reserving = self._later(self._reserve())
        if self._held or self.seq >= self.reserved:
            self._held.append((name, data, turn_id))  # published once ids are reserved
        else:
            self._publish(name, data, turn_id)
        return event_id

    def _publish(self, name: str, data: dict[str, Any], turn_id: str | None) -> None:
        self.seq += 1
        event = Event.make(name, data, self.seq, turn_id)
        self.ctx.writer.append(self.id, self.seq, turn_id, name, event.json)
        self.channel.publish(event)

    @property
    def _reserve_at(self) -> int:
        return self.reserved - RESERVE_IDS // 2

    async def _reserve(self) -> None:
        """Raise the loop's reservation ahead of the ids in use, then publish what waited."""
        try:
            while self.seq + len(self._held) >= self._reserve_at:
                target = self.seq + len(self._held) + RESERVE_IDS
                mine = (loops.c.id == self.id) & (loops.c.event_id_reserved < target)
                reserve = update(loops).where(mine).values(event_id_reserved=target)
                try:
                    await self.ctx.db.write_retrying(
                        lambda conn, q=reserve: conn.execute(q),
                        f"loop {self.id}: reserving event ids",
                    )
                except TRANSIENT:
                    continue  # nothing can be published before; `close` ends the attempts
                self.reserved = target
                held, self._held = self._held, []
                for event in held:
                    self._publish(*event)
        finally:
            self._reserving = None

    # ---- the worker ---------------------------------------------------------------

    async def _work(self) -> None:
        logctx.bind(loop_id=self.id, user=self.spec.owner)
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self.queue) and self.current is None)
                turn = self.queue.popleft()
                self.current = turn
            try:
                await self._run(turn)
            except Exception as exc:  # a bug must cost one turn, never the loop's worker
                log.exception("loop %s: turn %s failed", self.id, turn.id)
                await self._finish(turn, "error", _error("agent_failed", str(exc), turn.id))
            await turn.finished.wait()

    async def _run(self, turn: Turn) -> None:
        gate = self.ctx.budget_gate
        if gate is not None and turn.waited and turn.trigger == "message":
            author = turn.author["id"] if turn.author else self.spec.owner
            refusal = await gate(self.spec.owner, author, self.id, turn.id)
            if refusal is not None:
                error = _error("budget_exceeded", refusal.message, turn.id)
                await self._finish(turn, "error", error)
                return
        try:
            cold = await self._ensure_agent(turn.permission_mode)
        except EngineError as exc:
            await self._finish(turn, "error", _error(exc.code, exc.message, turn.id))
            return
        if turn.interrupt_requested:
            await self._finish(turn, "interrupted", {"turn_id": turn.id})
            return
        self._begin(turn, cold)
        assert self.agent is not None
        try:
            await self.agent.set_permission_mode(turn.permission_mode)
            await self.agent.query(await self._prompt(turn))
        except Exception as exc:  # the CLI went away between turns
            await self._finish(turn, "error", _error("agent_failed", str(exc), turn.id))
            await self._stop_agent()

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
        self.emit(
            "started", {"turn_id": turn.id, "cold_start": cold, "trigger": turn.trigger}, turn.id
        )
        turn.start_saved = self._later(self._save_turn_start(turn))

    async def _save_turn_start(self, turn: Turn) -> None:
        async def save(conn: AsyncConnection) -> None:
            if turn.trigger == "background":  # no request stored it before it began
                await conn.execute(turns.insert().values(**turn.new_row(self.id, "running")))
            else:
                started = {"ended": "running", "started_at": turn.started_at}
                await conn.execute(turns.update().where(turns.c.id == turn.id).values(**started))
            await conn.execute(
                update(loops)
                .where(loops.c.id == self.id)
                .values(active_at=turn.started_at, turn_count=self.spec.turn_count)
            )

        await self.ctx.db.write_retrying(save, f"loop {self.id}: saving the start of {turn.id}")

    async def _finish(self, turn: Turn, name: str, data: dict[str, Any]) -> None:
        if turn.finished.is_set():
            return
        turn.finished.set()
        self._end_choices(turn, INTERRUPTED)
        self._cancel_evict()
        self.emit(name, data, turn.id)
        if self.current is turn:
            self.current = None
        self.active_at = time.monotonic()
        ended = {"done": "done", "interrupted": "interrupted"}.get(name, "error")
        error = {"code": data["code"], "message": data["message"]} if ended == "error" else None
        turn.ended, turn.error, turn.ended_at = ended, error, utcnow()
        metrics.TURNS.labels(turn.trigger, ended).inc()
        if turn.span is not None:
            tracing.tracer.ended(turn.span, turn)
        self._bind_log(turn)
        if turn.started_at is not None:
            metrics.TURN_DURATION.observe((turn.ended_at - turn.started_at).total_seconds())
        log.info("turn %s of loop %s ended %s", turn.id, self.id, ended)
        self.unsaved[turn.id] = turn
        turn.end_saved = self._later(self._save_turn_end(turn))
        self._notify()
        if not self.queue and not self.closed:
            self._arm_idle()

    async def _save_turn_end(self, turn: Turn) -> None:
        # The start row must exist before the end updates it (background turns insert it).
        if turn.start_saved is not None:
            with contextlib.suppress(Exception):  # its failure is logged; the end is saved anyway
                await turn.start_saved
        usage = turn.usage.as_dict() if turn.usage is not None else {}
        end = (
            turns.update()
            .where(turns.c.id == turn.id)
            .values(
                ended=turn.ended,
                error=turn.error,
                ended_at=turn.ended_at,
                **usage,
                **turn.history_fields(),
            )
        )
        cost = update(loops).where(loops.c.id == self.id)
        cost = cost.values(session_cost_usd=self.spec.session_cost)

        async def save(conn: AsyncConnection) -> None:
            await conn.execute(end)
            if turn.usage is not None:
                await conn.execute(cost)

        await self.ctx.db.write_retrying(save, f"loop {self.id}: saving the end of {turn.id}")
        self.unsaved.pop(turn.id, None)

    # ---- the agent ----------------------------------------------------------------

    async def _ensure_agent(self, permission_mode: str) -> bool:
        if self.agent is not None and self.agent.alive:
            return False
        # Hook (issue 12): cold starts are bounded per replica (LOOPBRIDGE_MAX_STARTING);
        # the others queue here.
        async with self.ctx.starts.slot():
            return await self._start_agent(permission_mode)

    async def _start_agent(self, permission_mode: str) -> bool:
        spec = sandbox_spec(
            self.ctx.settings, self.id, self._agent_env(), self.spec.repo, self.spec.branch
        )
        try:
            host, _ = await self.ctx.sandbox.acquire(spec)
        except EngineError:
            raise
        except Exception as exc:
            log.exception("loop %s: the sandbox did not start", self.id)
            raise EngineError("sandbox_spawn_failed", f"the sandbox did not start: {exc}") from exc
        self.sandbox_held = True
        self.host = host
        for resume in dict.fromkeys([self.spec.session_id, None]):
            session = sdk.AgentSession(
                self._options(host, permission_mode, resume), self._on_message, self._on_exit
            )
            try:
                await session.start()
            except Exception as exc:
                failure = str(exc)
                log.warning("loop %s: agent did not start (resume=%s): %s", self.id, resume, exc)
                continue
            self.agent = session
            # A resumed session's running cost total carries on from where it was.
            self.meter = CostMeter(self.spec.session_cost if resume else 0.0)
            return True
        raise EngineError("agent_failed", f"the agent did not start: {failure}")

    def _options(self, host: Any, permission_mode: str, resume: str | None) -> ClaudeAgentOptions:
        profiles = [self.ctx.settings.profiles[name] for name in self.spec.profiles]
        prompt = "\n\n".join(p.system_prompt for p in profiles if p.system_prompt)
        model = next((p.model for p in reversed(profiles) if p.model), None)
        return ClaudeAgentOptions(
            cli_path=host.cli_path,
            cwd=host.cwd,
            env=host.env,
            resume=resume,
            permission_mode=permission_mode,  # type: ignore[arg-type]
            include_partial_messages=True,
            can_use_tool=self._can_use_tool,
            system_prompt={"type": "preset", "preset": "claude_code", "append": prompt}
            if prompt
            else {"type": "preset", "preset": "claude_code"},
            # share_file needs no permission in any mode.
            allowed_tools=sorted({SHARE_TOOL, *(t for p in profiles for t in p.allowed_tools)}),
            mcp_servers={SHARE_SERVER: share_server(self._share_file)},
            disallowed_tools=sorted({t for p in profiles for t in p.disallowed_tools}),
            model=model,
            setting_sources=[],
            # Makes bypassPermissions available without turning it on, so that a later turn
            # may switch to it on this warm agent whatever mode the agent started in.
            extra_args={"allow-dangerously-skip-permissions": None},
        )

    def _agent_env(self) -> dict[str, str]:
        env = dict(self.ctx.agent_env)
        vault = self.ctx.settings.vault(self.spec.vault)
        if vault is not None:
            env.update(vault.env)
        return env

    async def _stop_agent(self) -> None:
        session, self.agent = self.agent, None
        if session is not None:
            await session.stop()

    async def _on_exit(self, failure: str | None) -> None:
        self.agent = None
        turn = self.current
        if turn is not None and turn.started_at is not None and not turn.ending:
            message = failure or "the agent process ended"
            await self._finish(turn, "error", _error("agent_failed", message, turn.id))

    async def _on_message(self, message: Message) -> None:
        session_id = sdk.session_id_of(message)
        if session_id and session_id != self.spec.session_id:
            self.spec.session_id = session_id
            self._later(self._save_session_id(session_id))
        turn = self.current
        if turn is not None and turn.ending:
            return
        if turn is None or turn.started_at is None:
            if turn is not None or not sdk.starts_activity(message):
                return
            turn = self._begin_background()
        if isinstance(message, StreamEvent):
            delta = sdk.stream_delta(message)
            if delta is not None:
                kind, text = delta
                if kind == "assistant":
                    if not turn.text and turn.started_at is not None:
                        metrics.FIRST_DELTA.observe((utcnow() - turn.started_at).total_seconds())
                    turn.text.append(text)
                    turn.text_length += len(text)
                self.emit(f"{kind}_delta", {"text": text}, turn.id)
        elif isinstance(message, AssistantMessage):
            for block in sdk.tool_uses(message):
                if block.id in turn.tool_calls:
                    continue
                summary = sdk.summarize_input(block.name, block.input)
                data = {"tool_use_id": block.id, "tool": block.name, "input_summary": summary,
                        "input": tool_record.clipped_input(block.input)}
                call = {**data, "ok": None, "output": None, "diff": None,
                        "text_offset": turn.text_length}
                turn.tool_calls[block.id] = call
                turn.tool_inputs[block.id] = block.input
                call["event_id"] = self.emit("tool_call", data, turn.id)
        elif isinstance(message, UserMessage):
            results = sdk.tool_results(message)
            # The CLI's own account of a tool's run (e.g. an edit's patch), one per result.
            account = message.tool_use_result if len(results) == 1 else None
            for result in results:
                self._tool_result(turn, result, account)
        elif isinstance(message, ResultMessage):
            await self._end_with_result(turn, message)

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
        self.emit("tool_result", data, turn.id)

    async def _end_with_result(self, turn: Turn, result: ResultMessage) -> None:
        turn.usage = usage = usage_of(result, self.meter)
        self.spec.session_cost = self.meter.base
        metrics.MODEL_COST.inc(usage.cost_usd)
        for name, counter in TOKEN_COUNTERS.items():
            counter.inc(getattr(usage, name))
        if turn.interrupt_requested:
            await self._finish(turn, "interrupted", {"turn_id": turn.id})
        elif (failure := sdk.result_error(result)) is not None:
            await self._finish(turn, "error", _error("agent_failed", failure, turn.id))
        else:
            await self._finish(turn, "done", {"turn_id": turn.id, "usage": usage.as_dict()})

    def _begin_background(self) -> Turn:
        """The agent woke up by itself (e.g. a background command ended): a turn of its own."""
        self._cancel_idle()
        mode = self.agent.permission_mode if self.agent else "default"
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
        choice = make_choice(tool, tool_input, context.title)
        turn.pending[choice.id] = choice
        event_id = self.emit(
            "requires_choice",
            {"choice_id": choice.id, "kind": choice.kind, "payload": choice.payload},
            turn.id,
        )
        turn.choice_marks[choice.id] = {"event_id": event_id, "text_offset": turn.text_length}
        self._arm_evict(turn)
        outcome = await choice.future
        return decision(choice, outcome)

    async def _share_file(self, path: str, caption: str | None) -> str:
        """The agent's share_file: a file of its working directory, given to the people."""
        turn = self.current
        if turn is None or turn.finished.is_set():
            raise ValueError("no turn is running")
        host = self.host
        workdir = self.ctx.sandbox.workdir(self.id)
        insides = [str(workdir), *([host.inside] if host and host.inside else [])]
        try:
            relative = files.agent_relative(path, *insides)
            opened = await asyncio.to_thread(files.open_file, workdir, relative)
        except EngineError as exc:
            raise ValueError(f"cannot share {path}: {exc.message}") from None
        opened.close()
        data = {
            "path": opened.path,
            "size": opened.size,
            "media_type": opened.media_type,
            "caption": caption,
        }
        turn.files_shared.append(data)
        self.emit("file_shared", data, turn.id)
        return f"Shared {opened.path} ({opened.size} bytes) with the people in this conversation."

    def _end_choices(self, turn: Turn, outcome: str) -> None:
        for choice in turn.pending.values():
            if choice.pending:
                choice.future.set_result(outcome)
        turn.pending.clear()

    async def _interrupt_watchdog(self, turn: Turn) -> None:
        try:
            await asyncio.wait_for(turn.finished.wait(), INTERRUPT_GRACE_SECONDS)
        except TimeoutError:
            log.warning("loop %s: the agent ignored an interrupt; restarting it", self.id)
            turn.ending = True
            await self._stop_agent()
            await self._finish(turn, "interrupted", {"turn_id": turn.id})

    # ---- idle agent and idle sandbox ----------------------------------------------------

    def _arm_idle(self) -> None:
        """After the last turn: stop the agent after a while, and later the sandbox too
        (a sandbox may outlive its agent, e.g. for background processes)."""
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        settings = self.ctx.settings
        self._idle_timers = [
            loop.call_later(settings.agent_idle_seconds, self._when_idle, self._stop_agent),
            loop.call_later(settings.sandbox_idle_seconds, self._when_idle, self._reclaim),
        ]

    def _cancel_idle(self) -> None:
        for timer in self._idle_timers:
            timer.cancel()
        self._idle_timers = []

    def _when_idle(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if not self.busy and not self.closed:
            self._later(work())

    async def _reclaim(self) -> None:
        await self._reclaim_sandbox()
        self.ctx.forget(self)

    async def _reclaim_sandbox(self) -> None:
        await self._stop_agent()
        try:
            await self.ctx.sandbox.release(self.id)
        except Exception:
            log.exception("loop %s: releasing the sandbox failed", self.id)
        self.sandbox_held = False

    def _arm_evict(self, turn: Turn) -> None:
        self._cancel_evict()
        loop = asyncio.get_running_loop()
        delay = self.ctx.settings.sandbox_idle_seconds
        self._evict_timer = loop.call_later(delay, lambda: self._later(self._evict(turn)))

    async def _evict(self, turn: Turn) -> None:
        """Nobody answered for the sandbox's idle time: reclaim it, then end the turn, so the
        next turn finds everything stopped and starts afresh."""
        turn.ending = True
        self._end_choices(turn, EVICTED)
        await self._reclaim_sandbox()
        message = "the sandbox was reclaimed while a choice waited"
        await self._finish(turn, "error", _error("sandbox_evicted", message, turn.id))

    def _cancel_evict(self) -> None:
        if self._evict_timer is not None:
            self._evict_timer.cancel()
            self._evict_timer = None

    # ---- helpers --------------------------------------------------------------------

    def _bind_log(self, turn: Turn) -> None:
        author = turn.author["id"] if turn.author else self.spec.owner
        logctx.bind(loop_id=self.id, turn_id=turn.id, user=self.spec.owner, author=author)

    def _notify(self) -> None:
        self._later(self._notify_async())

    async def _notify_async(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _later(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work off the event path (mostly database writes), tracked until it ends;
        its failure is logged with the loop and the work's name."""
        task = spawn(coro, f"loop {self.id}: {coro.__qualname__}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _save_session_id(self, session_id: str) -> None:
        query = update(loops).where(loops.c.id == self.id).values(session_id=session_id)
        await self.ctx.db.write_retrying(
            lambda conn: conn.execute(query), f"loop {self.id}: saving its session id"
        )


def attribution(author: dict[str, str]) -> str:
    """`[from Alice Smith (slack:U123)]`: one line, and no bracket that could close it early."""
    plain = str.maketrans("[]", "()")
    return f"[from {author['name'].translate(plain)} ({author['id'].translate(plain)})]"


def _error(code: str, message: str, turn_id: str) -> dict[str, Any]:
    return {"code": code, "message": message, "turn_id": turn_id}


def sandbox_spec(
    settings: Settings, loop_id: str, env: dict[str, str], repo: str | None, branch: str | None
) -> SandboxSpec:
    """What a backend needs to prepare a loop: its repo's clone on the loop's branch."""
    config = settings.repos.get(repo) if repo else None
    if config is None:
        return SandboxSpec(loop_id, env)
    return SandboxSpec(loop_id, env, config.url, config.branch, branch)


def agent_env_from(environ: os._Environ[str] | dict[str, str], run_as_root: bool) -> dict[str, str]:
    """The server's variables an agent may see: the model endpoint and the CLI's own knobs."""
    # OTEL_*: the agent's own telemetry (with CLAUDE_CODE_ENABLE_TELEMETRY) passes through.
    env = {
        key: value
        for key, value in environ.items()
        if key.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "OTEL_"))
    }
    if run_as_root:
        # The CLI refuses bypassPermissions as root unless told it is sandboxed; the
        # engine, not the caller's environment, decides that a loop's agent may.
        env["IS_SANDBOX"] = "1"
    return env
