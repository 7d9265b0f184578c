"""The `bubblewrap` backend: each agent process in namespaces of its own, with no daemon.

Every agent CLI starts inside `bwrap` (Debian `bubblewrap`, the tool Flatpak and
Claude Code use on Linux). What the agent sees:
- the system read-only (`/usr`, `/etc`, the `/bin` and `/lib*` links), the CLI's
  directory and the Python the launcher needs, read-only;
- the loop's working directory and home, read-write, at their host paths; the
  rest of the data directory is an empty tmpfs (no database, no other loop);
- a private `/tmp`, `/var/tmp` and `/run`, its own `/proc` and `/dev`;
- new PID, IPC, UTS and cgroup namespaces: no other process is visible, the agent
  is pid 2 under bwrap's own init;
- only the environment the engine chose;
- the network of `LOOPBRIDGE_SANDBOX_NETWORK`: `model` (default) is loopback only,
  where a relay listens on the model API's port and forwards each connection to
  this server's Unix socket for that API (see `network.py`); `none` is loopback
  only; `host` is the host's network.

As root, the agent runs as the unprivileged `loopbridge-agent` user (bwrap starts
as root without a user namespace, keeps only the capabilities to change uid, and
the launcher inside gives them up for good before the CLI starts). Not root, bwrap
needs unprivileged user namespaces and the agent runs as the server's user.

The sandbox lives as long as its agent: bwrap ends with the agent CLI, and with the
server (`--die-with-parent`), and every process inside ends with it. Memory, CPU and
process counts are not capped here (podman does that).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import EngineError
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec, write_script
from core.sandbox.env import python_prefixes, shell_patterns
from core.sandbox.image import run
from core.sandbox.network import (
    DEFAULT_MODEL_URL,
    HOSTS_FILE,
    MODEL_SOCKET,
    ModelForwarder,
    ModelRoute,
    model_route,
    socket_dir,
)
from core.sandbox.users import AgentUser, agent_user, give_tree

INSTALL = "apt-get install bubblewrap"
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
NET_DIR = "/run/loopbridge"
INSIDE = "/run/loopbridge-launch.py"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The launcher inside runs on the Python this server runs on (its prefix is bound).
PYTHON = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
# A uid other than root may not listen below 1024; the relay moves such ports up.
PORT_SHIFT = 10000

# Runs on the host (bash starts in a few ms, Python in tens): keeps only the
# environment the engine chose, then becomes bwrap, whose options (paths only, no
# secrets) come from the loop's argument file; the command (the launcher inside,
# then the CLI) stays on the command line, where bwrap wants it.
LAUNCHER = """\
#!{bash}
keep=" $LOOPBRIDGE_AGENT_ENV LOOPBRIDGE_AGENT_ENV "
args=$LOOPBRIDGE_BWRAP_ARGS port=$LOOPBRIDGE_AGENT_PORT cli=$LOOPBRIDGE_AGENT_CLI
for name in $(compgen -e); do
  case "$name" in
    {patterns}) ;;
    *) [[ $keep == *" $name "* ]] || unset "$name" ;;
  esac
done
umask 022
exec {bwrap} --args 3 {command} "$port" "$cli" "$@" 3< "$args"
"""

# Runs inside the sandbox: starts the model relay (in the `model` network), gives up
# root for good (as root), then becomes the agent CLI. Arguments: uid gid port cli…
INSIDE_LAUNCHER = """\
import os, socket, sys, threading
uid, gid, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cli = sys.argv[4:]
# bash passes on what it cannot name: keep only what the engine chose.
keep = set(os.environ.pop("LOOPBRIDGE_AGENT_ENV", "").split())
prefixes = {prefixes}
env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(prefixes)}


def drop():
    # bwrap set no-new-privileges: once the uid is not 0, nothing gives root back.
    if uid >= 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def pipe(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for end in (src, dst):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener):
    while True:
        conn, _ = listener.accept()
        up = socket.socket(socket.AF_UNIX)
        try:
            up.connect("{socket}")
        except OSError:
            conn.close()
            up.close()
            continue
        for ends in ((conn, up), (up, conn)):
            threading.Thread(target=pipe, args=ends, daemon=True).start()


if port:
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        drop()
        serve(listener)
    listener.close()
drop()
os.execve(cli[0], cli, env)
"""


async def usable(settings: Settings) -> tuple[bool, str]:
    """Whether this backend can work here (down to running `true` in a sandbox); why."""
    if shutil.which("bwrap") is None:
        return False, f"bwrap is not installed: {INSTALL}"
    # In a directory of its own: the data dir is left as it is.
    with tempfile.TemporaryDirectory(prefix="lb-bwrap-") as scratch:
        sandbox = BubblewrapSandbox(Path(scratch), Path("/bin/true"), settings)
        try:
            await sandbox.start()
        except EngineError as exc:
            return False, exc.message
        finally:
            await sandbox.close()
    return True, sandbox.describe()


class BubblewrapSandbox(Sandbox):
    name = "bubblewrap"

    def __init__(self, data_dir: Path, cli_path: Path, settings: Settings) -> None:
        super().__init__(data_dir, cli_path)
        self.settings = settings
        self.launcher = data_dir / "bin" / "bwrap-agent-launch"
        self.inside = data_dir / "bin" / "bwrap-agent-inside.py"
        self.args_dir = data_dir / "sandbox" / "bwrap"
        self.bwrap = ""
        self.user: AgentUser | None = None
        self.forwarders: dict[str, ModelForwarder] = {}
        self.forwarders_lock = asyncio.Lock()
        self.started = False

    def describe(self) -> str:
        who = "as loopbridge-agent" if self.user is not None else "as this user"
        return f"bubblewrap ({self.bwrap}), agents {who}, network {self.settings.sandbox_network}"

    # -- server life ---------------------------------------------------------

    async def start(self) -> None:
        # `choose_sandbox` starts it to know whether it works; the engine starts it again.
        if self.started:
            return
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise EngineError("sandbox_spawn_failed", f"bwrap is not installed: {INSTALL}")
        self.bwrap = bwrap
        bash = shutil.which("bash")
        if bash is None:
            raise EngineError("sandbox_spawn_failed", "bash is not installed")
        self.launcher.parent.mkdir(parents=True, exist_ok=True)
        self.user = await agent_user()
        uid, gid = (self.user.uid, self.user.gid) if self.user is not None else (-1, -1)
        command = shlex.join([PYTHON, "-S", "-I", INSIDE, str(uid), str(gid)])
        text = LAUNCHER.replace("{bash}", bash).replace("{bwrap}", shlex.quote(bwrap))
        text = text.replace("{patterns}", shell_patterns())
        write_script(self.launcher, text.replace("{command}", command))
        self.args_dir.mkdir(parents=True, exist_ok=True)
        inside = INSIDE_LAUNCHER.replace("{socket}", f"{NET_DIR}/{MODEL_SOCKET}")
        write_script(self.inside, inside.replace("{prefixes}", python_prefixes()), 0o644)
        await self.try_sandbox()
        self.started = True

    async def try_sandbox(self) -> None:
        """Run `true` the way an agent runs: better to know at start than at every turn."""
        probe = self.data_dir / "sandbox" / "probe"
        work, home = probe / "work", probe / "home"
        work.mkdir(parents=True, exist_ok=True)
        home.mkdir(exist_ok=True)
        args = self.write_args("probe", self.options(work, home, None))
        env = {
            "LOOPBRIDGE_BWRAP_ARGS": str(args),
            "LOOPBRIDGE_AGENT_PORT": "0",
            "LOOPBRIDGE_AGENT_CLI": "/bin/true",
        }
        try:
            await run(str(self.launcher), cwd=work, env=env)
        except EngineError as exc:
            message = f"bubblewrap cannot run a sandbox here: {exc.message}"
            raise EngineError(exc.code, message) from None

    async def close(self) -> None:
        await asyncio.gather(*(fwd.close() for fwd in self.forwarders.values()))
        self.forwarders.clear()
        self.started = False

    # -- loops ---------------------------------------------------------------

    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        await self.prepare_dirs(spec)
        if self.user is not None:
            user = self.user
            await asyncio.to_thread(give_tree, self.loop_dir(spec.loop_id), user.uid, user.gid)
        workdir, home = self.workdir(spec.loop_id), self.home(spec.loop_id)
        env = {
            "PATH": SANDBOX_PATH,
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **spec.env,
        }
        route = None
        if self.settings.sandbox_network == "model":
            url = (
                spec.env.get("ANTHROPIC_BASE_URL")
                or os.environ.get("ANTHROPIC_BASE_URL")
                or DEFAULT_MODEL_URL
            )
            route = await self.ensure_forwarder(url)
            env["ANTHROPIC_BASE_URL"] = route.url_inside
        env["LOOPBRIDGE_AGENT_ENV"] = " ".join(sorted(env))
        options = self.options(workdir, home, route)
        args = await asyncio.to_thread(self.write_args, spec.loop_id, options)
        env["LOOPBRIDGE_BWRAP_ARGS"] = str(args)
        env["LOOPBRIDGE_AGENT_PORT"] = str(route_port(route))
        env["LOOPBRIDGE_AGENT_CLI"] = str(self.cli_path)
        host = AgentHost(cli_path=str(self.launcher), cwd=str(workdir), env=env, workdir=workdir)
        # Nothing outlives an agent here: each one starts its sandbox afresh.
        return host, False

    async def ensure_forwarder(self, url: str) -> ModelRoute:
        plain = model_route(url)
        port = plain.port + PORT_SHIFT if plain.port < 1024 else plain.port
        route = model_route(url, port_inside=port)
        async with self.forwarders_lock:
            if route.key not in self.forwarders:
                sockets = socket_dir(self.data_dir, self.settings.replica_id)
                forwarder = ModelForwarder(route, sockets / "net" / route.key)
                await forwarder.start()
                self.forwarders[route.key] = forwarder
        return route

    # -- the bwrap command line -----------------------------------------------

    def write_args(self, name: str, argv: list[str]) -> Path:
        """bwrap's options for `--args`, NUL-separated, in a file of the loop's."""
        path = self.args_dir / f"{name}.args"
        temporary = path.with_suffix(".new")
        temporary.write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
        temporary.replace(path)  # an agent starting meanwhile reads the old one whole
        return path

    def options(self, work: Path, home: Path, route: ModelRoute | None) -> list[str]:
        """bwrap's options for one agent (its command is in the launcher)."""
        args = [
            "--die-with-parent",
            "--new-session",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "loopbridge",
        ]
        if self.settings.sandbox_network != "host":
            args.append("--unshare-net")
        if self.user is not None:
            # Just enough for the launcher inside to become the agent's user.
            args += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
                args += ["--cap-add", cap]
        args += system_mounts()
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        args += ["--dir", "/var", "--perms", "1777", "--tmpfs", "/var/tmp", "--tmpfs", "/run"]
        made: set[Path] = set()
        for tree in {Path(sys.base_prefix).resolve(), self.cli_path.parent.resolve()}:
            if not under_system(tree):
                args += [*dirs_to(tree, made), "--ro-bind", str(tree), str(tree)]
        # The data dir is an empty tmpfs in there, whatever holds it on the host.
        args += [*dirs_to(self.data_dir, made), "--tmpfs", str(self.data_dir)]
        for path in (work, home):
            args += [*dirs_to(path, made), "--bind", str(path), str(path)]
        args += ["--ro-bind", str(self.inside), INSIDE]
        if route is not None:
            net = socket_dir(self.data_dir, self.settings.replica_id) / "net" / route.key
            args += ["--ro-bind", str(net), NET_DIR]
            args += ["--ro-bind", str(net / HOSTS_FILE), "/etc/hosts"]
        for secret in self.hidden_files():
            args += ["--ro-bind", "/dev/null", str(secret)]
        args += ["--chdir", str(work)]
        return args

    def hidden_files(self) -> list[Path]:
        """The settings file, where a system directory would show it (e.g. under /etc)."""
        named = os.environ.get("LOOPBRIDGE_CONFIG") or self.settings.config
        if not named:
            return []
        path = Path(named).resolve()
        return [path] if path.is_file() and under_system(path) else []


def route_port(route: ModelRoute | None) -> int:
    if route is None:
        return 0
    parts = urlsplit(route.url_inside)
    return parts.port or (443 if parts.scheme == "https" else 80)


def system_mounts() -> list[str]:
    """The host's system directories, read-only; merged-/usr links stay links."""
    args: list[str] = []
    for name in SYSTEM_DIRS:
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def under_system(path: Path) -> bool:
    """Whether `path` is in a system directory the sandbox shows anyway."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path("/") / name) for name in SYSTEM_DIRS)


def dirs_to(path: Path, made: set[Path]) -> list[str]:
    """`--dir` for each missing parent of `path` in the sandbox: bwrap would make them 0700,
    which the agent's user could not pass."""
    args: list[str] = []
    for parent in reversed(path.parents):
        if parent == Path("/") or parent in made or under_system(parent):
            continue
        made.add(parent)
        args += ["--dir", str(parent)]
    return args
