"""``rpbroker serve`` as an operator runs it: where it listens, its log lines, stopping it.

Each test runs the real command in a child process with real backends
(``examples/echo_backend.py``), sends it real signals and reads its stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

import rpbroker
import transports

from ..e2e.support import Workspace, round_trip
from ..e2e.test_e2e_supervision_helpers import pid_gone, wait_pids_gone
from .support import environment, parse_logfmt, run_rpbroker, start_serve, write_echo_service


def serve_args(workspace: Workspace, *extra: str) -> list[str]:
    return [
        "--socket", workspace.socket,
        "--services", str(workspace.services),
        "--runtime-dir", str(workspace.runtime),
        *extra,
    ]  # fmt: skip


async def backend_pids(socket: str) -> list[int]:
    status = await run_rpbroker("status", "--socket", socket, "--json")
    assert status.returncode == 0, status.stderr
    return [row["pid"] for row in json.loads(status.stdout)["backends"]]


async def test_serve_and_admin_commands_share_the_default_endpoint(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    xdg = workspace.root / "xdg"
    xdg.mkdir(mode=0o700)
    env = environment(XDG_RUNTIME_DIR=str(xdg))
    expected = str(xdg / "rpbroker" / f"rpb-v1-{transports.user_hash()}-shared.sock")
    (xdg / "rpbroker").mkdir(mode=0o700)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            served = await start_serve(
                nursery, "--services", str(workspace.services), "--log-level", "info", env=env
            )
            line = parse_logfmt(served.matching("serving on")[0])
            assert (line["logger"], line["socket"]) == ("rpbroker.serve", expected)
            assert line["msg"] == f"serving on {expected}"
            assert int(line["pid"]) == served.process.pid
            # No --socket, no $RPBROKER_SOCKET: the admin command finds it by default...
            status = await run_rpbroker("status", env=env)
            assert status.returncode == 0, status.stderr
            assert f"socket       {expected}" in status.stdout.splitlines()
            # ... and $RPBROKER_SOCKET, when set, is where it looks instead.
            elsewhere = str(workspace.root / "elsewhere.sock")
            missing = await run_rpbroker("healthz", env={**env, "RPBROKER_SOCKET": elsewhere})
            assert missing.returncode == 3
            assert f"no broker at {elsewhere}" in missing.stderr
            assert "--socket" in missing.stderr, "the message says where the socket comes from"
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
    assert not Path(expected).exists()


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)],
)
async def test_a_second_signal_during_the_drain_stops_at_once(
    workspace: Workspace, first: signal.Signals, second: signal.Signals
) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # A drain that would last a minute: the held connection keeps the backend busy.
            served = await start_serve(
                nursery, *serve_args(workspace, "--drain-timeout", "60", "--log-level", "error")
            )
            held = await rpbroker.open_connection("echo", "1.0.0", broker=workspace.socket)
            assert await round_trip(held, b"held") == b"held"
            [pid] = await backend_pids(workspace.socket)

            served.process.send_signal(first)
            await served.wait_for_line(f"{first.name}: shutting down gracefully")
            progress = parse_logfmt(
                await served.wait_for_line("draining: waiting for 1 backend, 1 connection, ")
            )
            assert (progress["backends"], progress["connections"]) == ("1", "1")
            assert 0 < int(progress["remaining_s"]) <= 60
            assert progress["waiting_for"] == f"echo/{pid}"
            assert progress["msg"].endswith(f"{progress['remaining_s']} s left")
            assert not pid_gone(pid)

            served.process.send_signal(second)
            assert await served.process.wait() == 128 + second
            await wait_pids_gone([pid])
            nursery.cancel_scope.cancel()
    assert served.matching(f"{second.name} during shutdown: stopping at once, killing 1 backend")
    assert parse_logfmt(served.lines[-1])["msg"] == "stopped at once"
    assert not Path(workspace.socket).exists(), "the socket file is removed"
    assert list(workspace.runtime.iterdir()) == [], "no backend endpoint is left"
    with contextlib.suppress(trio.BrokenResourceError):
        assert await held.receive_some(10) == b""
    await held.aclose()


async def test_a_drain_reports_progress_and_ends_cleanly(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            served = await start_serve(nursery, *serve_args(workspace, "--drain-timeout", "60"))
            held = await rpbroker.open_connection("echo", "1.0.0", broker=workspace.socket)
            assert await round_trip(held, b"held") == b"held"
            [pid] = await backend_pids(workspace.socket)
            served.process.send_signal(signal.SIGTERM)
            await served.wait_for_line("draining: waiting for 1 backend, 1 connection, ")
            # The backend finishes its last connection: the drain ends well before 60 s.
            await held.aclose()
            assert await served.process.wait() == 0
            nursery.cancel_scope.cancel()
    assert pid_gone(pid)
    assert not served.matching("drain time is up")
    assert parse_logfmt(served.lines[-1])["msg"] == "stopped"


async def test_log_lines_are_key_value_text(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # Mixed case on purpose: --log-level is case-insensitive.
            served = await start_serve(nursery, *serve_args(workspace, "--log-level", "InFo"))
            async with rpbroker.connect("echo", "1.0.0", broker=workspace.socket) as stream:
                assert await round_trip(stream, b"x") == b"x"
            await served.wait_for_line("connection opened")
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
            nursery.cancel_scope.cancel()
    parsed = [parse_logfmt(line) for line in served.lines]
    assert all("{'" not in line for line in served.lines), "no Python reprs"
    running = next(p for p in parsed if p.get("event") == "running")
    assert running["logger"] == "rpbroker.events"
    assert (running["service"], running["version"]) == ("echo", "1.0.0")
    assert running["pid"].isdigit()
    # The backend (run_backend) logs in the broker's format, saying which backend it
    # is; the broker captures its stderr and logs each line, saying whose it is.
    captured = [p for p in parsed if p["logger"] == "rpbroker.backend"]
    assert all(
        (p["service"], p["version"], p["pid"], p["level"])
        == ("echo", "1.0.0", running["pid"], "info")
        for p in captured
    )
    backend = next(parse_logfmt(p["line"]) for p in captured if "logger=echo" in p["line"])
    assert (backend["msg"], backend["backend"], backend["level"]) == (
        "connection opened",
        "echo",
        "info",
    )
    assert backend["backend_pid"] == running["pid"]
    assert next(p for p in captured if "logger=echo" in p["line"])["stream"] == "stderr"


async def test_log_format_json_is_one_typed_object_per_line(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            served = await start_serve(
                nursery, *serve_args(workspace, "--log-format", "json", "--log-level", "info")
            )
            async with rpbroker.connect("echo", "1.0.0", broker=workspace.socket) as stream:
                assert await round_trip(stream, b"x") == b"x"
            await served.wait_for_line('\\"logger\\": \\"echo\\"')
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
            nursery.cancel_scope.cancel()
    records = [json.loads(line) for line in served.lines]
    assert all(list(r)[:3] == ["ts", "level", "logger"] for r in records)
    serving = next(r for r in records if r["logger"] == "rpbroker.serve")
    assert serving["socket"] == workspace.socket and serving["pid"] == served.process.pid
    running = next(r for r in records if r.get("event") == "running")
    assert isinstance(running["pid"], int)
    captured = next(
        r for r in records if r["logger"] == "rpbroker.backend" and '"logger": "echo"' in r["line"]
    )
    assert (captured["service"], captured["pid"]) == ("echo", running["pid"])
    backend = json.loads(captured["line"])
    assert backend["backend_pid"] == running["pid"]
    assert records[-1]["msg"] == "stopped" and records[-1]["forced"] is False


async def test_make_demo_writes_only_formatted_log_lines() -> None:
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, str(demo)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment(),
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines()[-1] == "demo: OK"
    lines = result.stderr.decode().splitlines()
    crashed = [parse_logfmt(line) for line in lines if "event=crashed" in line]
    assert len(crashed) == 1 and crashed[0]["level"] == "warning"
    for line in lines:
        parse_logfmt(line)


async def test_serve_reports_operator_errors_in_one_line(workspace: Workspace) -> None:
    os.chmod(workspace.runtime, 0o755)
    result = await run_rpbroker("serve", *serve_args(workspace))
    assert result.returncode == 3
    assert result.stderr == (
        f"rpbroker: {workspace.runtime}: has mode 0755, which gives group or other users "
        f"access; run: chmod 700 {workspace.runtime}\n"
    )
    os.chmod(workspace.runtime, 0o700)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            served = await start_serve(nursery, *serve_args(workspace))
            second = await run_rpbroker("serve", *serve_args(workspace))
            assert second.returncode == 3
            assert second.stderr == (
                f"rpbroker: {workspace.socket} is in use: another process is listening on it\n"
            )
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
            nursery.cancel_scope.cancel()
