"""The composition root: the `loopbridge` command (serve, doctor, demo, adapters).

The only place that imports every layer: engine, server, client and adapters.
"""

from bridge.cli.main import main

__all__ = ["main"]
