"""Runs the stand-in alone: ``python -m bridge.standin --port 8700`` prints its URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from bridge.standin.server import DEFAULT_STAMP_DELAY, StandinModel


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bridge.standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delta-delay", type=float, default=0.0, help="seconds between deltas")
    parser.add_argument("--stamp-delay", type=float, default=DEFAULT_STAMP_DELAY)
    return parser.parse_args()


async def _serve(arguments: argparse.Namespace) -> None:
    model = StandinModel(
        arguments.host,
        arguments.port,
        delta_delay=arguments.delta_delay,
        stamp_delay=arguments.stamp_delay,
    )
    print(await model.start(), flush=True)
    await model.wait_closed()


def main() -> None:
    # uvicorn stops on Ctrl-C, then raises the captured signal again.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_arguments()))


if __name__ == "__main__":
    main()
