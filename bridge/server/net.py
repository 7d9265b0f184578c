"""Listening sockets for the server."""

from __future__ import annotations

import resource
import socket

# Enough for the connection cap (LOOPBRIDGE_MAX_CONNECTIONS) and everything else.
WANTED_FILES = 65536


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP listener whose connections get TCP_NODELAY.

    asyncio turns Nagle off only for sockets made with proto IPPROTO_TCP, which
    `socket.create_server` does not set; with Nagle on, every small SSE write
    waits ~40 ms for the peer's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def raise_file_limit() -> None:
    """Raise the soft limit of open files towards the hard one: the default 1024 would
    cap connections (and agents' pipes) long before memory does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
