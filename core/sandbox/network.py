"""The sandboxes' way to the model API, and where their Unix sockets live.

In the `model` network an agent's sandbox has loopback only; a relay inside it
listens where the CLI connects and passes each connection through a Unix
socket to this server, which connects to the model API's host and port and
nowhere else. TLS stays end to end: the API's host name resolves to 127.0.0.1
inside.

Unix socket paths are limited to 107 bytes, and data directories can be deeper
than that: sockets live in a short directory of their own, named for the data
directory (`/run/loopbridge-<hash>` as root, else under `$XDG_RUNTIME_DIR` or
`/tmp`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from core.errors import EngineError

log = logging.getLogger(__name__)

MODEL_SOCKET = "model.sock"
HOSTS_FILE = "hosts"
DEFAULT_MODEL_URL = "https://api.anthropic.com"


def socket_dir(data_dir: Path, replica: str = "") -> Path:
    """This data directory's short, private directory for Unix sockets (made 0700); one
    per replica, as replicas on one host may share the data directory."""
    mark = f"{data_dir}\0{replica}" if replica else str(data_dir)
    name = "loopbridge-" + hashlib.sha256(mark.encode()).hexdigest()[:12]
    if os.geteuid() == 0:
        base = Path("/run")
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
        name = f"{name}-{os.geteuid()}"
    path = base / name
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise EngineError("sandbox_spawn_failed", f"cannot make {path}: {exc.strerror}") from None
    # In a shared /tmp someone else could have made it first, or made it a link.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise EngineError("sandbox_spawn_failed", f"{path} exists and is not this user's own")
    path.chmod(0o700)
    return path


@dataclass(frozen=True)
class ModelRoute:
    """Where the model API is, and how a `model`-network sandbox reaches it."""

    host: str
    port: int
    url_inside: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.host}:{self.port}".encode()).hexdigest()[:12]


def model_route(url: str, port_inside: int | None = None) -> ModelRoute:
    """The route to `url`; inside, on `port_inside` when the sandbox cannot listen on its port."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise EngineError("sandbox_spawn_failed", f"ANTHROPIC_BASE_URL {url!r} has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    # An address literal cannot be pointed at 127.0.0.1 by /etc/hosts: rewrite it.
    inside = host if not is_address(host) else "127.0.0.1"
    if port_inside is not None and port_inside != port:
        netloc = f"{inside}:{port_inside}"
    else:
        netloc = f"{inside}:{port}" if parts.port else inside
    return ModelRoute(host, port, urlunsplit(parts._replace(netloc=netloc)))


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a connection: pass its end on, or on an error drop it.

    Closing a writer also ends reads on its socket, so a broken direction ends
    the other one too.
    """
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


class ModelForwarder:
    """A Unix socket whose every connection is joined to the model API's host and port.

    Its directory also holds the `hosts` file a sandbox uses to find the API at 127.0.0.1.
    """

    def __init__(self, route: ModelRoute, directory: Path) -> None:
        self.route = route
        self.directory = directory
        self.socket = directory / MODEL_SOCKET
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        # Readable by the agent's uid: the directory is bound into its sandbox.
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        names = "localhost" if is_address(self.route.host) else f"localhost {self.route.host}"
        (self.directory / HOSTS_FILE).write_text(f"127.0.0.1 {names}\n::1 localhost\n")
        self.socket.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self.connect, path=str(self.socket))
        # The agent runs as another uid and needs write permission to connect.
        self.socket.chmod(0o666)

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.route.host, self.route.port)
        except OSError as exc:
            log.warning("model API %s:%s unreachable: %s", self.route.host, self.route.port, exc)
            writer.close()
            return
        try:
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))
        finally:
            up_writer.close()
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
