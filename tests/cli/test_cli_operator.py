"""The operator's per-service and streaming commands, run as the real ``rpbroker``.

A broker runs in the test (``open_broker``, real backends); every command is
``rpbroker`` in a child process pointed at it with ``$RPBROKER_SOCKET``: ``stop``,
``restart``, ``quiesce`` SERVICE, ``events`` (``--json``, ``--follow``) and
``logs`` SERVICE (``--follow``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import trio

import rpbroker
from rpbroker.cli import ExitStatus

from ..e2e.support import Workspace, round_trip
from .support import environment, run_rpbroker

GUARD_S = 60


async def rpbroker_cmd(broker: rpbroker.Broker, *args: str) -> tuple[int, str, str]:
    result = await run_rpbroker(*args, env=environment(RPBROKER_SOCKET=broker.socket_path))
    return result.returncode, result.stdout, result.stderr


async def hello(broker: rpbroker.Broker, service: str) -> None:
    async with rpbroker.connect(service, "1.0.0", broker=broker.socket_path) as stream:
        assert await round_trip(stream, b"w") == b"w"


async def test_stop_restart_and_quiesce_one_service(workspace: Workspace) -> None:
    workspace.add_service("echo")
    workspace.add_service("other")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await hello(broker, "echo")
            await hello(broker, "other")
            [echo] = broker.backends.of_service("echo")
            [other] = broker.backends.of_service("other")
            stop = await rpbroker_cmd(broker, "stop", "echo", "--grace", "5")
            assert echo.ended.is_set() and other.routable
            refused = await rpbroker_cmd(broker, "stop", "echo", "--json")
            restart = await rpbroker_cmd(broker, "restart", "echo")
            await hello(broker, "echo")
            [fresh] = broker.backends.of_service("echo")
            quiesce = await rpbroker_cmd(broker, "quiesce", "echo")
            await fresh.ended.wait()
            assert other.routable
    code, out, err = stop
    assert code == ExitStatus.OK, err
    assert out.splitlines()[0] == (
        "stop: echo: 1 backend stopped; new Hellos are refused until `rpbroker restart echo`"
    )
    assert f"1.0.0 pid {echo.pid} stopped" in out.splitlines()[1]
    code, out, err = refused
    assert code == ExitStatus.OK, err
    document = json.loads(out)
    assert (document["command"], document["backends"], document["held"]) == (
        "service-stop",
        [],
        True,
    )
    code, out, err = restart
    assert code == ExitStatus.OK, err
    assert out.startswith("restart: echo: 0 backends stopped; the next Hello starts a fresh one")
    code, out, err = quiesce
    assert code == ExitStatus.OK, err
    assert out.startswith("quiesce: echo: 1 of 1 backend acknowledged")
    assert fresh.pid != echo.pid


async def test_an_unknown_service_is_a_clear_error_with_its_own_exit_status(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            results = [
                await rpbroker_cmd(broker, command, "nosuch")
                for command in ("stop", "restart", "quiesce", "logs")
            ]
    for code, out, err in results:
        assert code == ExitStatus.UNKNOWN_SERVICE, (out, err)
        assert "unknown service 'nosuch'" in err
        assert out == ""


async def test_events_prints_one_readable_line_per_event_or_json(workspace: Workspace) -> None:
    workspace.add_service("echo")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await hello(broker, "echo")
            [echo] = list(broker.backends)
            code, out, err = await rpbroker_cmd(broker, "events")
            json_code, json_out, _ = await rpbroker_cmd(broker, "events", "--json")
    assert code == ExitStatus.OK, err
    [running] = [line for line in out.splitlines() if "  running  " in line]
    assert f"service=echo version=1.0.0 pid={echo.pid}" in running
    assert out.splitlines()[0].split("  ")[1] == "broker-started"
    assert json_code == ExitStatus.OK
    kinds = [json.loads(line)["kind"] for line in json_out.splitlines()]
    assert kinds[0] == "broker-started" and "running" in kinds


async def test_logs_prints_the_kept_lines_of_a_service(workspace: Workspace) -> None:
    workspace.add_service("noisy", mode="noisy")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await hello(broker, "noisy")
            [noisy] = list(broker.backends)
            code, out, err = await rpbroker_cmd(broker, "logs", "noisy")
            json_code, json_out, _ = await rpbroker_cmd(broker, "logs", "noisy", "--json")
    assert code == ExitStatus.OK, err
    lines = out.splitlines()
    assert any(line.endswith(f"1.0.0 pid={noisy.pid} stderr  hello from stderr") for line in lines)
    assert any(line.endswith("[truncated]") for line in lines)
    assert json_code == ExitStatus.OK
    documents = [json.loads(line) for line in json_out.splitlines()]
    assert {(d["stream"], d["text"], d["pid"]) for d in documents} >= {
        ("stdout", "hello from stdout", noisy.pid),
        ("stderr", "hello from stderr", noisy.pid),
    }


async def _read_until(stdout: trio.abc.ReceiveStream, buffer: bytearray, needle: bytes) -> None:
    while needle not in buffer:
        chunk = await stdout.receive_some()
        assert chunk, f"the command ended before printing {needle!r}: {bytes(buffer)!r}"
        buffer += chunk


async def test_following_events_and_logs_prints_live_lines_until_ctrl_c(
    workspace: Workspace,
) -> None:
    workspace.add_service("noisy", mode="noisy")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await hello(broker, "noisy")
            [first] = list(broker.backends)
            env = environment(RPBROKER_SOCKET=broker.socket_path)
            events = await trio.lowlevel.open_process(
                [sys.executable, "-m", "rpbroker", "events", "--follow"],
                stdout=subprocess.PIPE,
                env=env,
            )
            logs = await trio.lowlevel.open_process(
                [sys.executable, "-m", "rpbroker", "logs", "noisy", "-f"],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert events.stdout is not None and logs.stdout is not None
            seen_events, seen_logs = bytearray(), bytearray()
            try:
                # The kept records come after the subscription: once they are
                # printed, every later one is printed live.
                await _read_until(events.stdout, seen_events, b"  running  ")
                await _read_until(logs.stdout, seen_logs, b"hello from stderr")
                first.stop()
                await first.ended.wait()
                await hello(broker, "noisy")
                [fresh] = list(broker.backends)
                await _read_until(events.stdout, seen_events, f"pid={fresh.pid}".encode())
                await _read_until(
                    logs.stdout, seen_logs, f"pid={fresh.pid} stderr  hello from stderr".encode()
                )
            finally:
                for process in (events, logs):
                    process.send_signal(signal.SIGINT)
                    await process.wait()
            await broker.wait_connections_closed()
            assert broker.events.subscriber_count == 0
            assert broker.backends.output.follower_count == 0
    assert events.returncode == 128 + signal.SIGINT
    assert logs.returncode == 128 + signal.SIGINT
