"""A loop's agent CLI and the sandbox it runs in: started on demand, stopped when idle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import (
    ClaudeAgentOptions,
    PermissionResultAllow,
    PermissionResultDeny,
    ToolPermissionContext,
)

from bridge.contract.models import PermissionMode
from core import agent as sdk
from core.config import Settings
from core.errors import EngineError
from core.sandbox import AgentHost, Sandbox, SandboxSpec
from core.share import SERVER as SHARE_SERVER
from core.share import SHARE_TOOL, share_server
from core.starts import StartGate
from core.turn import LoopSpec
from core.usage import CostMeter

log = logging.getLogger(__name__)

Later = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[Any]"]
CanUseTool = Callable[
    [str, dict[str, Any], ToolPermissionContext],
    Awaitable[PermissionResultAllow | PermissionResultDeny],
]


@dataclass(frozen=True)
class AgentHooks:
    """What the agent calls back into its loop's runtime."""

    on_message: sdk.OnMessage
    on_exit: sdk.OnExit
    can_use_tool: CanUseTool
    share_file: Callable[[str, str | None], Awaitable[str]]


def sandbox_spec(
    settings: Settings, loop_id: str, env: dict[str, str], repo: str | None, branch: str | None
) -> SandboxSpec:
    """What a backend needs to prepare a loop: its repo's clone on the loop's branch."""
    config = settings.repos.get(repo) if repo else None
    if config is None:
        return SandboxSpec(loop_id, env)
    return SandboxSpec(loop_id, env, config.url, config.branch, branch)


class AgentSlot:
    def __init__(
        self,
        settings: Settings,
        sandbox: Sandbox,
        agent_env: dict[str, str],
        spec: LoopSpec,
        hooks: AgentHooks,
        later: Later,
        starts: StartGate,
    ) -> None:
        self._settings = settings
        self._sandbox = sandbox
        self._agent_env = agent_env
        self._spec = spec
        self._hooks = hooks
        self._later = later
        self._starts = starts
        self.agent: sdk.AgentSession | None = None
        self.host: AgentHost | None = None
        self.meter = CostMeter(spec.session_cost)
        self.sandbox_held = False
        self._idle_timers: list[asyncio.TimerHandle] = []

    async def ensure(self, permission_mode: PermissionMode) -> bool:
        """A live agent for the next turn; whether one had to be started (a cold start)."""
        if self.agent is not None and self.agent.alive:
            return False
        # Cold starts are bounded per replica (LOOPBRIDGE_MAX_STARTING); the others queue.
        async with self._starts.slot():
            return await self._start(permission_mode)

    async def _start(self, permission_mode: PermissionMode) -> bool:
        loop = self._spec.id
        spec = sandbox_spec(self._settings, loop, self._env(), self._spec.repo, self._spec.branch)
        try:
            host, sandbox_cold = await self._sandbox.acquire(spec)
        except EngineError:
            raise
        except Exception as exc:
            log.exception("loop %s: the sandbox did not start", loop)
            raise EngineError("sandbox_spawn_failed", f"the sandbox did not start: {exc}") from exc
        sandbox_state = "new" if sandbox_cold else "warm"
        log.info("loop %s: starting its agent (%s sandbox)", loop, sandbox_state)
        self.sandbox_held = True
        self.host = host
        failure = "no attempt"
        for resume in dict.fromkeys([self._spec.session_id, None]):
            session = sdk.AgentSession(
                self._options(host, permission_mode, resume),
                self._hooks.on_message,
                self._hooks.on_exit,
            )
            try:
                await session.start()
            except Exception as exc:
                failure = str(exc)
                log.warning("loop %s: agent did not start (resume=%s): %s", loop, resume, exc)
                continue
            self.agent = session
            # A resumed session's running cost total carries on from where it was.
            self.meter = CostMeter(self._spec.session_cost if resume else 0.0)
            return True
        raise EngineError("agent_failed", f"the agent did not start: {failure}")

    def _options(
        self, host: AgentHost, permission_mode: PermissionMode, resume: str | None
    ) -> ClaudeAgentOptions:
        profiles = [self._settings.profiles[name] for name in self._spec.profiles]
        prompt = "\n\n".join(p.system_prompt for p in profiles if p.system_prompt)
        model = next((p.model for p in reversed(profiles) if p.model), None)
        return ClaudeAgentOptions(
            cli_path=host.cli_path,
            cwd=host.cwd,
            env=host.env,
            resume=resume,
            permission_mode=permission_mode,
            include_partial_messages=True,
            can_use_tool=self._hooks.can_use_tool,
            system_prompt={"type": "preset", "preset": "claude_code", "append": prompt}
            if prompt
            else {"type": "preset", "preset": "claude_code"},
            # share_file needs no permission in any mode.
            allowed_tools=sorted({SHARE_TOOL, *(t for p in profiles for t in p.allowed_tools)}),
            mcp_servers={SHARE_SERVER: share_server(self._hooks.share_file)},
            disallowed_tools=sorted({t for p in profiles for t in p.disallowed_tools}),
            model=model,
            setting_sources=[],
            # Makes bypassPermissions available without turning it on, so that a later turn
            # may switch to it on this warm agent whatever mode the agent started in.
            extra_args={"allow-dangerously-skip-permissions": None},
        )

    def _env(self) -> dict[str, str]:
        env = dict(self._agent_env)
        vault = self._settings.vault(self._spec.vault)
        if vault is not None:
            env.update(vault.env)
        return env

    async def stop(self) -> None:
        session, self.agent = self.agent, None
        if session is not None:
            await session.stop()

    def release(self) -> None:
        """Stop this idle agent to make room for another; its next turn resumes it."""
        session, self.agent = self.agent, None
        if session is not None:
            self._later(session.stop())

    async def reclaim(self) -> None:
        """Stop the agent and give the sandbox back."""
        await self.stop()
        try:
            await self._sandbox.release(self._spec.id)
        except Exception:
            log.exception("loop %s: releasing the sandbox failed", self._spec.id)
        self.sandbox_held = False

    # ---- idle agent and idle sandbox ----------------------------------------------------

    def arm_idle(self, still_idle: Callable[[], bool], reclaimed: Callable[[], None]) -> None:
        """After the last turn: stop the agent after a while, and later the sandbox too
        (a sandbox may outlive its agent, e.g. for background processes)."""
        self.cancel_idle()

        def when_idle(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
            if still_idle():
                self._later(work())

        async def reclaim() -> None:
            await self.reclaim()
            reclaimed()

        loop = asyncio.get_running_loop()
        self._idle_timers = [
            loop.call_later(self._settings.agent_idle_seconds, when_idle, self.stop),
            loop.call_later(self._settings.sandbox_idle_seconds, when_idle, reclaim),
        ]

    def cancel_idle(self) -> None:
        for timer in self._idle_timers:
            timer.cancel()
        self._idle_timers = []
