"""The Loop API v1's Python client: `LoopClient` and its errors.

It speaks only the contract (`bridge.contract`); it imports nothing of the server
or the engine, so adapters and scripts can use it anywhere.
"""

from bridge.client.loops import (
    IN_PROCESS_URL,
    Download,
    LoopApiError,
    LoopClient,
    Reconnect,
)

__all__ = [
    "IN_PROCESS_URL",
    "Download",
    "LoopApiError",
    "LoopClient",
    "Reconnect",
]
