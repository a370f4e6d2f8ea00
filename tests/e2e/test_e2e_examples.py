"""The example scripts, run exactly as the README shows: a broker, then clients against it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .support import child_pids

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: Bound on the whole run, seconds: a backend spawn on a loaded machine.
HANG_GUARD_S = 60


async def run_client(socket_path: str, *flags: str) -> str:
    result = await trio.run_process(
        [sys.executable, str(EXAMPLES / "client.py"), "--socket", socket_path, *flags],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.mark.slow
async def test_example_broker_serves_the_example_client_on_every_route() -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            broker = await trio.lowlevel.open_process(
                [sys.executable, str(EXAMPLES / "broker.py")], stdout=subprocess.PIPE
            )
            assert broker.stdout is not None
            seen = b""
            while b"\n" not in seen:
                chunk = await broker.stdout.receive_some()
                assert chunk, "examples/broker.py exited before listening"
                seen += chunk
            first = seen.split(b"\n", 1)[0].decode()
            assert first.startswith("broker listening on ")
            socket_path = first.removeprefix("broker listening on ")

            async def drain() -> None:
                assert broker.stdout is not None
                while await broker.stdout.receive_some():
                    pass

            nursery.start_soon(drain)
            assert await run_client(socket_path) == "route=handoff reply='hello, broker'\n"
            assert await run_client(socket_path, "--no-handoff", "--message", "second") == (
                "route=reconnect reply='second'\n"
            )
            assert await run_client(socket_path, "--blocking") == (
                "route=handoff reply='hello, broker'\n"
            )
            assert await run_client(socket_path, "--blocking", "--no-handoff") == (
                "route=reconnect reply='hello, broker'\n"
            )
            broker.send_signal(signal.SIGTERM)
            assert await broker.wait() == 0
            nursery.cancel_scope.cancel()
    assert not Path(socket_path).exists()
    assert child_pids() == set()
