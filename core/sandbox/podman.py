"""The `podman` backend: one container per loop, managed through the Podman API.

Containers are made with podman-py against a Podman service (started here
unless `podman_url` names one); the agent CLI runs inside through `podman exec
-i`, because podman-py cannot attach stdin to an exec. podman-py is
synchronous: every call goes through `asyncio.to_thread`.

In a container only the loop's working directory (/work), its home
(/home/agent) and the bundled CLI's directory (/opt/loopbridge, read-only) come
from the host. The root is read-only (tmpfs on /tmp, /var/tmp, /run), every
capability is dropped, privileges cannot be gained, and memory, CPU and process
count are capped. Networks (`sandbox_network`):
- `host`: the host's network;
- `none`: loopback only; the agent cannot reach the model either;
- `model`: loopback only, where a socat (the container's main process) listens
  on the model API's port and forwards each connection through a Unix socket to
  this server, which connects to the model API's host and port, and nowhere
  else. TLS stays end to end: the API's host name resolves to 127.0.0.1 inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from podman import PodmanClient
from podman.domain.containers import Container
from podman.errors import APIError, ImageNotFound, NotFound

from core.config import Settings
from core.errors import EngineError
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec, write_script
from core.sandbox.env import python_prefixes
from core.sandbox.image import (
    RECIPE_LABEL,
    build_image,
    load_recipe,
    podman_argv,
    podman_env,
    recipe_path,
    run,
)
from core.sandbox.network import (
    DEFAULT_MODEL_URL,
    MODEL_SOCKET,
    ModelForwarder,
    ModelRoute,
    is_address,
    model_route,
    socket_dir,
)
from core.sandbox.users import chown_tree

log = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_LABEL = "loopbridge.loop"
SERVER_LABEL = "loopbridge.server"
# Replicas may share a data directory: each one touches only the containers it made.
REPLICA_LABEL = "loopbridge.replica"
CONFIG_LABEL = "loopbridge.config"
WORKDIR = "/work"
HOME = "/home/agent"
CLI_DIR = "/opt/loopbridge"
NET_DIR = "/run/loopbridge"
AGENT_UID = 1000
PR_SET_PDEATHSIG = 1
# crun fails on these machines (containers.conf picks runc); `init` needs catatonit.
INSTALL = "apt-get install --no-install-recommends podman runc catatonit"

# The SDK hands the launcher its whole environment; only what the engine chose
# (and the CLI's own prefixes, as in the local backend) goes into the container,
# by name, so values never appear on a command line. The two names podman itself
# needs (PATH, CONTAINERS_CONF) go by value and keep the server's values for podman.
#
# `podman exec` does not pass signals on: when the SDK stops an agent that does not
# end by itself (it waits for a background command), a SIGTERM would end the exec
# client and leave the CLI running in the container, free to wake up later and call
# the model. So the launcher stays, as the exec's parent: the CLI writes its pid to a
# file in the container's /tmp, and a signal for the launcher is sent to that pid.
# The launcher asks for that signal when the server ends too, even by SIGKILL.
LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl({pdeathsig}, signal.SIGTERM)
keep = set(os.environ.get("LOOPBRIDGE_AGENT_ENV", "").split())
prefixes = {prefixes}
names = sorted(k for k in os.environ if k in keep or k.startswith(prefixes))
own = {{"PATH": {path!r}, "CONTAINERS_CONF": {conf!r}}}
env = {{**os.environ, **own}}
flags = [f"--env={{k}}={{os.environ[k]}}" if k in own else f"--env={{k}}" for k in names]
container = os.environ["LOOPBRIDGE_CONTAINER"]
pidfile = f"/tmp/agent-{{os.getpid()}}.pid"
record = 'echo $$ > "$0" && exec "$@"'
argv = [*{podman!r}, "exec", "-i", "--detach-keys=", "--workdir={workdir}", *flags,
        container, "/bin/sh", "-c", record, pidfile, {cli!r}, *sys.argv[1:]]


def spawn(argv, quiet=False):
    pid = os.fork()
    if pid == 0:
        if quiet:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
        os.execve(argv[0], argv, env)
    return pid


def forward(signum, frame):
    kill = ["/bin/sh", "-c", f'kill -{{signum}} "$(cat {{pidfile}})"']
    os.waitpid(spawn([*{podman!r}, "exec", container, *kill], quiet=True), 0)


signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
agent = spawn(argv)
# Only the exec holds the SDK's pipes now: their ends are its ends.
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
_, status = os.waitpid(agent, 0)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


# Waits on its stdin: a byte means the server removed its containers itself; the end
# of the pipe without one means the server died, and it removes them.
WATCHDOG = """\
import json, os, subprocess, sys
podman, labels = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if os.read(0, 1):
    sys.exit(0)
filters = [f"--filter=label={label}" for label in labels]
found = subprocess.run([*podman, "ps", "-aq", *filters],
                       capture_output=True, text=True).stdout.split()
if found:
    subprocess.run([*podman, "rm", "-f", "-t", "0", *found], capture_output=True)
"""


async def usable(image: str, podman_url: str | None = None) -> tuple[bool, str]:
    """Whether this backend can work here; the one-line reason either way."""
    if shutil.which("podman") is None:
        return False, f"podman is not installed: {INSTALL}"
    podman = podman_argv(podman_url)
    try:
        info = await run(
            *podman,
            "info",
            "--format",
            "{{.Version.Version}} {{.Host.OCIRuntime.Name}}",
            env=podman_env(),
        )
    except EngineError as exc:
        return False, exc.message
    version, runtime = info.split()
    found = await asyncio.create_subprocess_exec(
        *podman, "image", "exists", image, env=podman_env()
    )
    if await found.wait() == 0:
        return True, f"podman {version} with {runtime}, image {image} present"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return False, f"image {image} is missing and needs apt-get and dpkg-deb to be built"
    return True, f"podman {version} with {runtime}; image {image} will be built"


class PodmanSandbox(Sandbox):
    name = "podman"

    def __init__(self, data_dir: Path, cli_path: Path, settings: Settings) -> None:
        super().__init__(data_dir, cli_path)
        self.settings = settings
        self.launcher = data_dir / "bin" / "podman-agent-launch"
        self.replica = settings.replica_id
        self.sockets = socket_dir(data_dir, self.replica)
        self.service_socket = self.sockets / "podman.sock"
        self.service: asyncio.subprocess.Process | None = None
        self.watchdog: asyncio.subprocess.Process | None = None
        self.url = settings.podman_url
        self.client: PodmanClient | None = None
        self.image_id = ""
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.forwarders: dict[str, ModelForwarder] = {}
        # Container names differ per replica too: a loop moved to another replica must
        # not meet the container its old replica has not removed yet.
        mark = f"{data_dir}\0{self.replica}"
        self.prefix = "loopbridge-" + hashlib.sha256(mark.encode()).hexdigest()[:8]

    # -- server life ---------------------------------------------------------

    async def start(self) -> None:
        # `choose_sandbox` starts it to know whether it works; the engine starts it again.
        if self.client is not None:
            return
        try:
            if self.url is None:
                self.url = await self.start_service()
            self.client = PodmanClient(base_url=self.url)
            self.write_launcher()
            self.image_id = await self.ensure_image()
            await self.try_container()
            await self.tidy_leftovers()
            await self.tidy_abandoned()
            await self.start_watchdog()
        except (APIError, OSError) as exc:  # requests' errors are OSErrors
            await self.close()
            raise EngineError("sandbox_spawn_failed", f"the podman API failed: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.client is not None:
            try:
                made = await self.call(
                    self.client.containers.list, all=True, filters=self.filters()
                )
                await asyncio.gather(*(self.discard(c) for c in made))
            except (APIError, OSError) as exc:  # requests' errors are OSErrors
                log.warning("could not remove the sandboxes: %s", exc)
            self.client.close()  # type: ignore[no-untyped-call]  # podman-py's own
            self.client = None
        if self.watchdog is not None:
            await stop_watchdog(self.watchdog)
            self.watchdog = None
        await asyncio.gather(*(fwd.close() for fwd in self.forwarders.values()))
        self.forwarders.clear()
        if self.service is not None:
            await stop_process(self.service)
            self.service = None

    async def start_service(self) -> str:
        """Run `podman system service` on a socket in the short socket dir; its URL."""
        self.service_socket.unlink(missing_ok=True)
        url = f"unix://{self.service_socket}"
        log_path = self.data_dir / "podman-service.log"
        with log_path.open("ab") as log_file:
            self.service = await asyncio.create_subprocess_exec(
                *podman_argv(None),
                "system",
                "service",
                "--time=0",
                url,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=podman_env(),
                # conmon, started by the service, writes an `oom` file into its working
                # directory when a container runs out of memory: keep that in the data dir.
                cwd=self.data_dir,
                # Its own session, so a Ctrl-C in the terminal does not stop it before
                # `close` has stopped the containers through it; and it ends with this
                # process even when `close` never runs (SIGKILL).
                start_new_session=True,
                preexec_fn=die_with(os.getpid()),
            )
        for _ in range(200):
            if self.service.returncode is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise EngineError(
                    "sandbox_spawn_failed", f"podman service exited: {tail[0] if tail else '?'}"
                )
            if self.service_socket.exists():
                return url
            await asyncio.sleep(0.05)
        raise EngineError("sandbox_spawn_failed", "podman service did not open its socket in 10 s")

    @property
    def cli_url(self) -> str | None:
        """The podman command's `--url`: none for the service this server runs itself."""
        return None if self.service is not None else self.url

    def write_launcher(self) -> None:
        podman = podman_argv(self.cli_url)
        text = LAUNCHER.format(
            path=os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            conf=podman_env()["CONTAINERS_CONF"],
            podman=podman,
            workdir=WORKDIR,
            cli=f"{CLI_DIR}/{self.cli_path.name}",
            pdeathsig=PR_SET_PDEATHSIG,
            prefixes=python_prefixes(),
        )
        self.launcher.parent.mkdir(parents=True, exist_ok=True)
        write_script(self.launcher, f"#!{sys.executable} -S\n{text}")

    async def ensure_image(self) -> str:
        """The sandbox image's id, building it when missing or made from another recipe."""
        tag = self.settings.sandbox_image
        digest = load_recipe(recipe_path(self.data_dir)).digest
        try:
            image = await self.call(self.api.images.get, tag)
            if image.labels.get(RECIPE_LABEL) == digest:
                return str(image.id)
        except ImageNotFound:
            pass
        # Shown without any logging set up: the server's first start waits for this.
        log.warning("building the sandbox image %s (`loopbridge sandbox build` does it ahead)", tag)
        await build_image(tag, self.data_dir, progress=log.info, url=self.cli_url)
        image = await self.call(self.api.images.get, tag)
        return str(image.id)

    async def try_container(self) -> None:
        """Run `true` in a container limited like a loop's: podman can be installed and
        answer, yet not run containers here (no cgroup controllers, in an unprivileged
        container); better to know at start than at every loop's first turn."""
        s = self.settings
        limits = [
            f"--memory={s.sandbox_memory}",
            f"--pids-limit={s.sandbox_pids}",
            f"--cpus={s.sandbox_cpus}",
        ]
        try:
            await run(
                *podman_argv(self.cli_url),
                "run",
                "--rm",
                "--network=none",
                "--read-only",
                "--cap-drop=ALL",
                "--security-opt=no-new-privileges",
                *limits,
                self.image_id,
                "true",
                env=podman_env(),
            )
        except EngineError as exc:
            message = f"podman cannot run a container here: {exc.message}"
            raise EngineError(exc.code, message) from None

    async def start_watchdog(self) -> None:
        """A process outside this one's session that removes this replica's containers
        when this process ends without `close` (SIGKILL, a crash): nothing keeps running."""
        self.watchdog = await asyncio.create_subprocess_exec(
            sys.executable,
            "-S",
            "-c",
            WATCHDOG,
            json.dumps(podman_argv(self.cli_url)),
            json.dumps(self.labels()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=podman_env(),
            cwd="/",
            start_new_session=True,
        )

    async def tidy_leftovers(self) -> None:
        """Remove what an earlier run of this replica left (its watchdog died with it),
        and this data dir's containers made before replicas were labelled; another
        server's or replica's are not ours to touch."""
        containers = await self.call(
            self.api.containers.list, all=True, filters=[f"label={SERVER_LABEL}={self.data_dir}"]
        )
        ours = [c for c in containers if c.labels.get(REPLICA_LABEL, self.replica) == self.replica]
        await asyncio.gather(*(self.discard(c) for c in ours))

    async def tidy_abandoned(self) -> None:
        """Remove the sandboxes of any server whose data dir is gone: nobody can adopt them."""
        if urlsplit(self.url or "").scheme != "unix":
            return  # a remote service's data dirs are on another machine
        containers = await self.call(
            self.api.containers.list, all=True, filters=[f"label={SERVER_LABEL}"]
        )
        for container in abandoned(containers):
            await self.discard(container)

    # -- loops ---------------------------------------------------------------

    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        async with self.locks[spec.loop_id]:
            await self.prepare_dirs(spec)
            route = model_route(
                spec.env.get("ANTHROPIC_BASE_URL")
                or os.environ.get("ANTHROPIC_BASE_URL")
                or DEFAULT_MODEL_URL
            )
            options = self.container_options(spec.loop_id, route)
            container = await self.find(spec.loop_id)
            wanted = options["labels"][CONFIG_LABEL]
            if container is not None and container.labels.get(CONFIG_LABEL) != wanted:
                await self.discard(container)
                container = None
            cold = container is None or container.status != "running"
            if self.settings.sandbox_network == "model":
                await self.ensure_forwarder(route)
            if container is None:
                container = await self.create(spec.loop_id, options)
            if container.status != "running":
                await self.start_container(container)
            return self.agent_host(spec, route), cold

    async def release(self, loop_id: str) -> None:
        async with self.locks[loop_id]:
            container = await self.find(loop_id)
            if container is not None and container.status == "running":
                await self.call(container.stop, timeout=2)

    async def remove(self, loop_id: str) -> None:
        async with self.locks[loop_id]:
            container = await self.find(loop_id)
            if container is not None:
                await self.discard(container)
        self.locks.pop(loop_id, None)

    def agent_host(self, spec: SandboxSpec, route: ModelRoute) -> AgentHost:
        env = dict(spec.env)
        if self.settings.sandbox_network == "model":
            env["ANTHROPIC_BASE_URL"] = route.url_inside
        env["LOOPBRIDGE_AGENT_ENV"] = " ".join(sorted(env))
        env["LOOPBRIDGE_CONTAINER"] = self.container_name(spec.loop_id)
        workdir = self.workdir(spec.loop_id)
        # The SDK needs a host directory to spawn the launcher in; the CLI's own
        # working directory is /work inside the container.
        return AgentHost(
            cli_path=str(self.launcher), cwd=str(workdir), env=env, workdir=workdir, inside=WORKDIR
        )

    # -- containers ----------------------------------------------------------

    def container_name(self, loop_id: str) -> str:
        return f"{self.prefix}-{loop_id}"

    def labels(self) -> list[str]:
        """This replica's containers' labels, `key=value`: podman takes several label
        filters as all of them."""
        return [f"{SERVER_LABEL}={self.data_dir}", f"{REPLICA_LABEL}={self.replica}"]

    def filters(self) -> list[str]:
        # podman-py turns a dict's list values into one string: only a list of
        # `key=value` filters keeps one filter per label.
        return [f"label={label}" for label in self.labels()]

    async def find(self, loop_id: str) -> Container | None:
        try:
            return await self.call(self.api.containers.get, self.container_name(loop_id))
        except NotFound:
            return None

    def agent_user(self) -> str:
        # As root, the agent gets its own uid; rootless, container root is the
        # server's own user already.
        return f"{AGENT_UID}:{AGENT_UID}" if os.geteuid() == 0 else "0:0"

    def container_options(self, loop_id: str, route: ModelRoute) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "image": self.image_id,
            "name": self.container_name(loop_id),
            "user": self.agent_user(),
            "environment": {"HOME": HOME, "CLAUDE_CONFIG_DIR": f"{HOME}/.claude"},
            "workdir": WORKDIR,
            "mounts": [
                bind(self.workdir(loop_id), WORKDIR),
                bind(self.home(loop_id), HOME),
                # The directory, not the file: an upgraded CLI is a new file.
                bind(self.cli_path.parent, CLI_DIR, read_only=True),
                # Podman 4.3's API adds no tmpfs to a read-only root by itself.
                *(tmpfs(path) for path in ("/tmp", "/var/tmp", "/run")),
            ],
            "read_only": True,
            "cap_drop": ["ALL"],
            "no_new_privileges": True,
            "init": True,
            "mem_limit": s.sandbox_memory,
            "memswap_limit": s.sandbox_memory,
            "pids_limit": s.sandbox_pids,
            "cpu_period": 100_000,
            "cpu_quota": int(s.sandbox_cpus * 100_000),
            "network_mode": "host" if s.sandbox_network == "host" else "none",
            "stop_timeout": 2,
        }
        if s.sandbox_network == "model":
            options["mounts"].append(bind(self.forwarder_dir(route), NET_DIR, read_only=True))
            options |= model_network_options(route)
        # Containers made with other options (settings, image, model API) are remade.
        digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
        options["labels"] = {
            LOOP_LABEL: loop_id,
            SERVER_LABEL: str(self.data_dir),
            REPLICA_LABEL: self.replica,
            CONFIG_LABEL: digest.hexdigest()[:16],
        }
        return options

    async def create(self, loop_id: str, options: dict[str, Any]) -> Container:
        if os.geteuid() == 0:
            await asyncio.to_thread(chown_tree, self.loop_dir(loop_id), AGENT_UID, AGENT_UID)
        try:
            return await self.call(self.api.containers.create, **options)
        except APIError as exc:
            raise EngineError("sandbox_spawn_failed", f"cannot create the sandbox: {exc}") from exc

    async def start_container(self, container: Container) -> None:
        try:
            await self.call(container.start)
            await self.call(container.reload)
        except APIError as exc:
            raise EngineError("sandbox_spawn_failed", f"cannot start the sandbox: {exc}") from exc
        if container.status != "running":
            raise EngineError(
                "sandbox_spawn_failed", f"the sandbox stopped at once ({container.status})"
            )

    def forwarder_dir(self, route: ModelRoute) -> Path:
        return self.sockets / "net" / route.key

    async def ensure_forwarder(self, route: ModelRoute) -> None:
        if route.key in self.forwarders:
            return
        forwarder = ModelForwarder(route, self.forwarder_dir(route))
        await forwarder.start()
        self.forwarders[route.key] = forwarder

    async def discard(self, container: Container) -> None:
        """Remove a container at once: `force` alone waits out a graceful stop first."""
        with contextlib.suppress(APIError):  # it was not running
            await self.call(container.kill)
        await self.call(container.remove, force=True)

    @property
    def api(self) -> PodmanClient:
        if self.client is None:
            raise EngineError("sandbox_spawn_failed", "the podman sandbox is not started")
        return self.client

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking podman-py call off the event loop."""
        return await asyncio.to_thread(func, *args, **kwargs)


def model_network_options(route: ModelRoute) -> dict[str, Any]:
    """socat as the container's main process, listening where the CLI will connect."""
    listen = f"TCP-LISTEN:{route.port},bind=127.0.0.1,fork,reuseaddr"
    options: dict[str, Any] = {
        "command": ["socat", listen, f"UNIX-CONNECT:{NET_DIR}/{MODEL_SOCKET}"],
        # The agent's uid may listen on 443 inside its own network namespace.
        "sysctls": {"net.ipv4.ip_unprivileged_port_start": "0"},
    }
    if not is_address(route.host):
        options["extra_hosts"] = {route.host: "127.0.0.1"}
    return options


def bind(source: Path, target: str, read_only: bool = False) -> dict[str, Any]:
    return {"type": "bind", "source": str(source), "target": target, "read_only": read_only}


def tmpfs(target: str) -> dict[str, Any]:
    return {"type": "tmpfs", "source": "tmpfs", "target": target, "mode": "1777"}


def abandoned(containers: list[Container]) -> list[Container]:
    return [c for c in containers if not Path(c.labels.get(SERVER_LABEL) or "/").is_dir()]


def die_with(parent: int) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel end the child when `parent` ends."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent ended before the line above
            os._exit(1)

    return preexec


async def stop_watchdog(proc: asyncio.subprocess.Process) -> None:
    """Tell the watchdog that this server removed its containers itself."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.write(b".")
            await proc.stdin.drain()
            proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()
