"""A brokered echo service: every byte received on a connection is sent back.

Started by the broker (see examples/services/echo.toml); it serves clients that
reconnect to its endpoint and connections handed off by the broker with the same
handler.
"""

from __future__ import annotations

import logging

import trio

from rpbroker.backend import run_backend

logger = logging.getLogger("echo")


async def echo(stream: trio.abc.Stream) -> None:
    # Shown when the broker runs with --log-level info or debug (backends log like it).
    logger.info("connection opened")
    while data := await stream.receive_some():
        await stream.send_all(data)


if __name__ == "__main__":
    run_backend(echo)
