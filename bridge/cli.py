"""The `loopbridge` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.serve import run
from core.errors import EngineError, SettingsError

DEMO_USER = "demo"


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopbridge", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the Loop API server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8642)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="run the server with a scripted stand-in model")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8642)
    demo.set_defaults(run=_demo)

    slack = commands.add_parser(
        "slack", help="run the Slack adapter against LOOPBRIDGE_API_URL (see docs/slack.md)"
    )
    slack.set_defaults(run=_slack)

    discord = commands.add_parser(
        "discord", help="run the Discord adapter against LOOPBRIDGE_API_URL"
    )
    discord.add_argument(
        "--invite-url", action="store_true", help="print the URL that adds the bot to a server"
    )
    discord.set_defaults(run=_discord)

    users = commands.add_parser("users", help="manage users").add_subparsers(title="users")
    add = users.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read a password for login")
    add.set_defaults(run=_users_add)

    tokens = commands.add_parser("tokens", help="manage API tokens").add_subparsers(title="tokens")
    create = tokens.add_parser("create", help="create a token (prints it last)")
    create.add_argument("--user", required=True)
    create.add_argument("--label", default="")
    create.set_defaults(run=_tokens_create)
    listing = tokens.add_parser("list", help="list a user's tokens")
    listing.add_argument("--user", required=True)
    listing.set_defaults(run=_tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke a token")
    revoke.add_argument("token_id")
    revoke.set_defaults(run=_tokens_revoke)

    sandbox = commands.add_parser("sandbox", help="the podman sandbox").add_subparsers(
        title="sandbox"
    )
    build = sandbox.add_parser("build", help="build the sandbox image from Debian packages")
    build.set_defaults(run=_sandbox_build)

    audit = commands.add_parser(
        "audit",
        help="who approved or denied tool calls, answered questions, interrupted; budget refusals",
    )
    audit.add_argument(
        "--since", default="7d", help="how far back: 30m, 24h, 7d, or an RFC 3339 time (7d)"
    )
    audit.add_argument("--loop", help="only this loop")
    audit.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    audit.set_defaults(run=_audit)

    doctor = commands.add_parser(
        "doctor", help="check podman, the image, the agent CLI, the model API and the database"
    )
    doctor.set_defaults(run=_doctor)
    return parser


# ---- accounts --------------------------------------------------------------------------


async def _with_accounts(work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    from core.accounts import Accounts
    from core.config import load_settings
    from core.storage import Database

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        await _migrate(db)
        await work(Accounts(db))
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


# ---- the audit trail ---------------------------------------------------------------------


async def _audit(args: argparse.Namespace) -> None:
    from core import audit
    from core.config import load_settings
    from core.storage import Database

    since = _since(args.since)
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        await _migrate(db)
        found = await audit.entries(db, since=since, loop=args.loop)
    finally:
        await db.close()
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
    from core.config import load_settings
    from core.sandbox.image import build_image, recipe_path

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_path(settings.data_dir)
    print(f"building {settings.sandbox_image} from {recipe}", flush=True)
    await build_image(
        settings.sandbox_image,
        settings.data_dir,
        progress=lambda line: print(line, flush=True),
        url=settings.podman_url,
    )


async def _doctor(args: argparse.Namespace) -> None:
    from bridge.doctor import doctor
    from core.config import load_settings

    if not await doctor(load_settings()):
        raise SystemExit(1)


# ---- adapters --------------------------------------------------------------------------


async def _slack(args: argparse.Namespace) -> None:
    from adapters.settings import AdapterSettingsError
    from adapters.slack.runner import run_slack

    try:
        await run_slack()
    except AdapterSettingsError as exc:
        raise CommandError(str(exc)) from None


async def _discord(args: argparse.Namespace) -> None:
    from adapters.discord.runner import print_invite_url, run_discord
    from adapters.settings import AdapterSettingsError

    try:
        if args.invite_url:
            print_invite_url()
        else:
            await run_discord()
    except AdapterSettingsError as exc:
        raise CommandError(str(exc)) from None


# ---- the server ------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, on_ready: Callable[[int], None] | None = None) -> None:
    from bridge.serve import ServeError, serve

    try:
        await serve(args.host, args.port, on_ready)
    except ServeError as exc:
        raise CommandError(str(exc)) from None


async def _demo(args: argparse.Namespace) -> None:
    from bridge.standin import StandinModel

    model = StandinModel()
    url = await model.start()
    home = os.environ.get("LOOPBRIDGE_HOME") or tempfile.mkdtemp(prefix="loopbridge-demo-")
    os.environ.update(
        {
            "LOOPBRIDGE_HOME": home,
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "sk-standin",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
        }
    )
    token = await _demo_token()

    def show(port: int) -> None:
        base = f"http://{args.host}:{port}/api/v1"
        auth = f"Authorization: Bearer {token}"
        print(
            "\nThis demo runs the real Claude Code agent against a SCRIPTED STAND-IN MODEL "
            f"at {url}:\nno API key is used, and the answers are canned "
            "(it echoes; [[bash: CMD]] runs a command, [[ask]] asks a question).\n"
            f"Data directory: {home}\n\nStream a turn:\n\n"
            f"  LOOP=$(curl -s -X POST {base}/loops -H {shlex.quote(auth)} "
            "-H 'Content-Type: application/json' -d '{\"title\": \"demo\"}' "
            "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')\n"
            f"  curl -sN -X POST {base}/loops/$LOOP/messages -H {shlex.quote(auth)} "
            "-H 'Content-Type: application/json' -d '{\"content\": \"hello\"}'\n\n"
            f"API docs: {base}/docs   ·   Ctrl-C stops the demo.",
            flush=True,
        )

    try:
        await _serve(args, on_ready=show)
    finally:
        with contextlib.suppress(Exception):
            await model.stop()


async def _demo_token() -> str:
    token = ""

    async def work(accounts: Any) -> None:
        nonlocal token
        await accounts.ensure_user(DEMO_USER)
        _, token = await accounts.create_token(DEMO_USER, "demo")

    await _with_accounts(work)
    return token


if __name__ == "__main__":
    main()
