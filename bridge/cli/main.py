"""The `loopbridge` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.cli.serve import run
from core.errors import EngineError, SettingsError

DEMO_USER = "demo"
MAX_PORT = 65535


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        raise SystemExit(2)
    try:
        run(args.run(args))
    except (SettingsError, EngineError, CommandError) as exc:
        print(f"loopbridge: {_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


class CommandError(Exception):
    pass


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, EngineError) else str(exc)


# Environment variables each command reads (beside LOOPBRIDGE_CONFIG, the settings file).
ENGINE_ENV = ("home", "database_url")
SERVER_ENV = (
    *ENGINE_ENV,
    "sandbox",
    "default_permission_mode",
    "agent_idle_seconds",
    "sandbox_idle_seconds",
    "rate_limit_per_minute",
    "cli_path",
    "max_starting",
)
MODEL_ENV = (
    "ANTHROPIC_API_KEY (the model key, handed to agents)",
    "ANTHROPIC_BASE_URL (default: Anthropic's API)",
)
SERVE_MORE = (
    "LOOPBRIDGE_SLACK_* (docs/slack.md) and LOOPBRIDGE_DISCORD_* (docs/discord.md) start the "
    "adapters inside the server",
)
UNSET_DEFAULTS = {
    "database_url": "SQLite in the data directory",
    "cli_path": "the CLI bundled with claude-agent-sdk",
    "podman_url": "podman on this machine",
}
ADAPTER_ENV = (
    "LOOPBRIDGE_API_URL (the server, e.g. http://127.0.0.1:8642)",
    "LOOPBRIDGE_API_TOKEN (`loopbridge tokens create --user NAME`)",
)


def _environment(fields: tuple[str, ...] = (), more: tuple[str, ...] = ()) -> str:
    """The help's list of the environment variables a command reads, with defaults."""
    from core.config import ENV_PREFIX, Settings

    lines = ["environment:"]
    for name in fields:
        default = Settings.model_fields[name].default
        shown = UNSET_DEFAULTS.get(name, "none") if default is None else str(default)
        lines.append(f"  {ENV_PREFIX}{name.upper()} (default: {shown})")
    lines += [f"  {line}" for line in more]
    lines.append("  LOOPBRIDGE_CONFIG (a TOML file of settings; the environment wins over it)")
    return "\n".join(lines)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the environment list kept as written."""


def _command(
    commands: Any, name: str, summary: str, run: Any, environment: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=environment or None,
        formatter_class=_Help,
    )
    parser.set_defaults(run=run)
    return parser


def _listening(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8642, help="TCP port (0: any free one)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopbridge",
        description=__doc__,
        formatter_class=_Help,
        epilog="`loopbridge COMMAND --help` lists a command's options, their defaults and "
        "the environment variables it reads.",
    )
    commands = parser.add_subparsers(title="commands")
    server_env = _environment(SERVER_ENV, (*MODEL_ENV, *SERVE_MORE))

    _listening(_command(commands, "serve", "run the Loop API server", _serve, server_env))

    demo = _command(
        commands,
        "demo",
        "run the server with a scripted stand-in model (no API key)",
        _demo,
        "environment:\n  LOOPBRIDGE_HOME (default: a new temporary directory, removed at the "
        "end unless --keep)",
    )
    _listening(demo)
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's data directory and its containers when it ends",
    )

    _command(
        commands,
        "slack",
        "run the Slack adapter against LOOPBRIDGE_API_URL (docs/slack.md)",
        _slack,
        _environment(more=(*ADAPTER_ENV, "LOOPBRIDGE_SLACK_* (docs/slack.md)")),
    )
    discord = _command(
        commands,
        "discord",
        "run the Discord adapter against LOOPBRIDGE_API_URL (docs/discord.md)",
        _discord,
        _environment(more=(*ADAPTER_ENV, "LOOPBRIDGE_DISCORD_* (docs/discord.md)")),
    )
    discord.add_argument(
        "--invite-url", action="store_true", help="print the URL that adds the bot to a server"
    )

    accounts_env = _environment(ENGINE_ENV)
    users = commands.add_parser("users", help="manage users").add_subparsers(title="users")
    add = _command(users, "add", "add a user", _users_add, accounts_env)
    add.add_argument("name", help="the user's name")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read a password (for the browser login) from standard input",
    )

    tokens = commands.add_parser("tokens", help="manage API tokens").add_subparsers(title="tokens")
    create = _command(
        tokens, "create", "create a token (printed last)", _tokens_create, accounts_env
    )
    create.add_argument("--user", required=True, help="whose token (made if new)")
    create.add_argument("--label", default="", help="a note to tell tokens apart")
    listing = _command(tokens, "list", "list a user's tokens", _tokens_list, accounts_env)
    listing.add_argument("--user", required=True, help="whose tokens")
    revoke = _command(tokens, "revoke", "revoke a token", _tokens_revoke, accounts_env)
    revoke.add_argument("token_id", help="the token's id (tok_…, from `tokens list`)")

    keys = commands.add_parser("keys", help="the server's signing key").add_subparsers(title="keys")
    rotate = keys.add_parser(
        "rotate", help="replace the key that signs view links: every link made before ends"
    )
    rotate.set_defaults(run=_keys_rotate)

    sandbox = commands.add_parser("sandbox", help="the podman sandbox").add_subparsers(
        title="sandbox"
    )
    _command(
        sandbox,
        "build",
        "build the sandbox image from Debian packages",
        _sandbox_build,
        _environment(("home", "sandbox_image", "podman_url")),
    )

    audit = _command(
        commands,
        "audit",
        "who approved or denied tool calls, answered questions, interrupted; budget refusals",
        _audit,
        _environment(ENGINE_ENV),
    )
    audit.add_argument(
        "--since", default="7d", help="how far back: 30m, 24h, 7d, or an RFC 3339 time"
    )
    audit.add_argument("--loop", help="only this loop")
    audit.add_argument("--json", action="store_true", help="a JSON array instead of lines")

    doctor = _command(
        commands,
        "doctor",
        "check the data directory, podman, the image, the agent CLI, the model API and key, "
        "and the database",
        _doctor,
        _environment((*SERVER_ENV, "sandbox_image"), MODEL_ENV),
    )
    doctor.add_argument(
        "--offline", action="store_true", help="skip the checks that reach the model API"
    )
    return parser


# ---- accounts --------------------------------------------------------------------------


async def _with_accounts(work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    from core.accounts import Accounts

    async with _database() as db:
        await work(Accounts(db))


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[Any]:
    """The settings' database, migrated, for a command that runs without the server."""
    from core.config import load_settings, prepare_data_dir
    from core.database_url import check_database_url
    from core.storage import Database

    settings = load_settings()
    prepare_data_dir(settings)
    check_database_url(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    try:
        await _migrate(db)
        yield db
    finally:
        await db.close()


async def _migrate(db: Any) -> None:
    try:
        await db.migrate()
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot open the database {db.url}: {exc}") from None
    except Exception as exc:
        raise SettingsError(
            f"cannot open the database {db.url}: {type(exc).__name__}: {exc}"
        ) from None


async def _users_add(args: argparse.Namespace) -> None:
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise CommandError("no password on standard input")

    async def work(accounts: Any) -> None:
        await accounts.add_user(args.name, password)
        print(f"added user {args.name}")

    await _with_accounts(work)


async def _tokens_create(args: argparse.Namespace) -> None:
    async def work(accounts: Any) -> None:
        await accounts.ensure_user(args.user)
        info, token = await accounts.create_token(args.user, args.label)
        print(f"token {info.token_id} for {args.user} (shown once):")
        print(token)

    await _with_accounts(work)


async def _tokens_list(args: argparse.Namespace) -> None:
    async def work(accounts: Any) -> None:
        if not await accounts.user_exists(args.user):
            raise CommandError(f"no user {args.user}")
        for info in await accounts.list_tokens(args.user):
            used = info.last_used_at.isoformat() if info.last_used_at else "never"
            created = info.created_at.isoformat()
            print(f"{info.token_id}\t{info.label or '-'}\tcreated {created}\tused {used}")

    await _with_accounts(work)


async def _tokens_revoke(args: argparse.Namespace) -> None:
    async def work(accounts: Any) -> None:
        if not await accounts.revoke_token(args.token_id):
            raise CommandError(f"no active token {args.token_id}")
        print(f"revoked {args.token_id}")

    await _with_accounts(work)


async def _keys_rotate(args: argparse.Namespace) -> None:
    from bridge.server.web.grants import rotate_key
    from core.config import load_settings

    try:
        path = rotate_key(load_settings().data_dir)
    except OSError as exc:
        raise CommandError(f"cannot write the signing key: {exc}") from None
    print(f"rotated the view-link signing key ({path}): every view link made before has ended")


# ---- the audit trail ---------------------------------------------------------------------


async def _audit(args: argparse.Namespace) -> None:
    from core import audit

    since = _since(args.since)
    async with _database() as db:
        found = await audit.entries(db, since=since, loop=args.loop)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in found], indent=2, ensure_ascii=False))
        return
    for entry in found:
        print(_audit_line(entry))


def _since(value: str) -> datetime:
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    text = value.strip()
    if text[:-1].isdigit() and text[-1:] in units:
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--since {value!r}: give 30m, 24h, 7d or an RFC 3339 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _audit_line(entry: Any) -> str:
    """One line: when, what, who (and where), which loop and turn."""
    detail = entry.detail
    if entry.kind == "permission":
        verdict = "allowed" if detail.get("answer", {}).get("allow") else "denied"
        what = f"{verdict} {detail.get('tool')}: {detail.get('input_summary')}"
    elif entry.kind == "question":
        what = f"answered {detail.get('questions')}: {detail.get('answer', {}).get('answers')}"
    elif entry.kind == "interrupt":
        what = "interrupted the turn"
    else:
        what = f"refused ({detail.get('budget')}): {detail.get('message')}"
    who = entry.person_id or entry.user
    if entry.person_name:
        who += f" ({entry.person_name})"
    via = f" via {entry.source}" if entry.source else ""
    at = entry.at.isoformat().replace("+00:00", "Z")
    where = f"{entry.loop_id or '-'} {entry.turn_id or '-'}"
    return f"{at}  {entry.kind:<10}  {who}{via} (API user {entry.user})  {what}  [{where}]"


# ---- the sandbox and the doctor -----------------------------------------------------------


async def _sandbox_build(args: argparse.Namespace) -> None:
    from core.config import load_settings, prepare_data_dir
    from core.sandbox.image import build_image, recipe_path

    settings = load_settings()
    prepare_data_dir(settings)
    recipe = recipe_path(settings.data_dir)
    print(f"building {settings.sandbox_image} from {recipe}", flush=True)
    await build_image(
        settings.sandbox_image,
        settings.data_dir,
        progress=lambda line: print(line, flush=True),
        url=settings.podman_url,
    )


async def _doctor(args: argparse.Namespace) -> None:
    from bridge.cli.doctor import doctor
    from core.config import load_settings

    if not await doctor(load_settings(), offline=args.offline):
        raise SystemExit(1)


# ---- adapters --------------------------------------------------------------------------


async def _slack(args: argparse.Namespace) -> None:
    from adapters.settings import AdapterSettingsError
    from adapters.slack.runner import run_slack
    from adapters.startup import PlatformError

    try:
        await run_slack()
    except (AdapterSettingsError, PlatformError) as exc:
        raise CommandError(str(exc)) from None


async def _discord(args: argparse.Namespace) -> None:
    from adapters.discord.runner import print_invite_url, run_discord
    from adapters.settings import AdapterSettingsError
    from adapters.startup import PlatformError

    try:
        if args.invite_url:
            print_invite_url()
        else:
            await run_discord()
    except (AdapterSettingsError, PlatformError) as exc:
        raise CommandError(str(exc)) from None


# ---- the server ------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, on_ready: Callable[[int], None] | None = None) -> None:
    from bridge.cli.serve import ServeError, serve

    if not 0 <= args.port <= MAX_PORT:
        raise CommandError(f"--port {args.port} is not a TCP port (0 to {MAX_PORT})")
    try:
        await serve(args.host, args.port, on_ready)
    except ServeError as exc:
        raise CommandError(str(exc)) from None


async def _demo(args: argparse.Namespace) -> None:
    from bridge.standin import StandinModel

    model = StandinModel()
    url = await model.start()
    given = os.environ.get("LOOPBRIDGE_HOME")
    home = given or tempfile.mkdtemp(prefix="loopbridge-demo-")
    os.environ.update(
        {
            "LOOPBRIDGE_HOME": home,
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "sk-standin",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
        }
    )
    # A data directory the person named is theirs to keep; the containers go all the same.
    kept = given is not None or args.keep

    if args.keep:
        ending = "kept, with its containers, when the demo ends"
    elif kept:
        ending = "kept when the demo ends; its containers are removed"
    else:
        ending = "removed, with its containers, when the demo ends (--keep keeps them)"

    def show(port: int) -> None:
        print(_demo_guide(args.host, port, url, home, token, ending), flush=True)

    try:
        token = await _demo_token()
        await _serve(args, on_ready=show)
    finally:
        with contextlib.suppress(Exception):
            await model.stop()
        if not args.keep:
            await _remove_demo(home, data=not kept)


def _demo_guide(host: str, port: int, model: str, home: str, token: str, ending: str) -> str:
    base = f"http://{host}:{port}/api/v1"
    auth = shlex.quote(f"Authorization: Bearer {token}")
    loopbridge = _loopbridge_command()
    return (
        "\nThis demo runs the real Claude Code agent against a SCRIPTED STAND-IN MODEL "
        f"at {model}:\nno API key is used, and the answers are canned "
        "(it echoes; [[bash: CMD]] runs a command, [[ask]] asks a question).\n"
        f"Data directory: {home} ({ending})\n\nStream a turn:\n\n"
        f"  LOOP=$(curl -s -X POST {base}/loops -H {auth} "
        "-H 'Content-Type: application/json' -d '{\"title\": \"demo\"}' "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')\n"
        f"  curl -sN -X POST {base}/loops/$LOOP/messages -H {auth} "
        "-H 'Content-Type: application/json' -d '{\"content\": \"hello\"}'\n\n"
        "The README's commands work against this demo from another shell once it has the "
        "demo's data directory:\n\n"
        f"  export LOOPBRIDGE_HOME={shlex.quote(home)}\n"
        f"  {loopbridge} tokens create --user alice\n\n"
        f"API docs: {base}/docs   ·   Ctrl-C stops the demo."
    )


def _loopbridge_command() -> str:
    """How to run this very `loopbridge` from another shell (the venv need not be active)."""
    beside = Path(sys.executable).parent / "loopbridge"
    return shlex.quote(str(beside)) if beside.is_file() else "loopbridge"


async def _remove_demo(home: str, *, data: bool) -> None:
    """The demo's containers (labelled with its data directory), and with `data` the
    directory itself."""
    from core.errors import EngineError
    from core.sandbox.image import podman_argv, podman_env, run
    from core.sandbox.podman import SERVER_LABEL

    data_dir = await asyncio.to_thread(os.path.realpath, home)
    with contextlib.suppress(EngineError, OSError):
        podman = podman_argv(os.environ.get("LOOPBRIDGE_PODMAN_URL"))
        found = await run(
            *podman,
            "ps",
            "--all",
            "--quiet",
            "--filter",
            f"label={SERVER_LABEL}={data_dir}",
            env=podman_env(),
        )
        if ids := found.split():
            await run(*podman, "rm", "--force", *ids, env=podman_env())
    if data:
        await asyncio.to_thread(shutil.rmtree, data_dir, ignore_errors=True)


async def _demo_token() -> str:
    token = ""

    async def work(accounts: Any) -> None:
        nonlocal token
        await accounts.ensure_user(DEMO_USER)
        _, token = await accounts.create_token(DEMO_USER, "demo")

    await _with_accounts(work)
    return token
