"""The one definition of the environment an agent may see.

The engine picks the server's variables with these prefixes (the model endpoint and
key, the CLI's own knobs) and hands them, with the loop's vault, to the sandbox;
every tier's launcher keeps only those names and, of what the SDK adds itself
(`CLAUDE_CODE_ENTRYPOINT` and the like), the ones with these prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping

# The narrowest list the agent CLI needs. Not OTEL_* (the server's exporter headers may
# hold credentials) nor CLAUDE_AGENT_SDK_* (the SDK's own, read by the server's side).
AGENT_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_")


def agent_env_from(environ: Mapping[str, str], run_as_root: bool) -> dict[str, str]:
    """The server's variables an agent may see: the model endpoint and the CLI's own knobs."""
    env = {key: value for key, value in environ.items() if key.startswith(AGENT_ENV_PREFIXES)}
    if run_as_root:
        # The CLI refuses bypassPermissions as root unless told it is sandboxed; the
        # engine, not the caller's environment, decides that a loop's agent may.
        env["IS_SANDBOX"] = "1"
    return env


def python_prefixes() -> str:
    """The prefixes as a Python literal, for the launchers written in Python."""
    return repr(AGENT_ENV_PREFIXES)


def shell_patterns() -> str:
    """The prefixes as a `case` pattern, for the launcher written in bash."""
    return "|".join(f"{prefix}*" for prefix in AGENT_ENV_PREFIXES)
