"""Foreign backends end to end: real broker, real processes that are not rpbroker SDK backends.

A ``[foreign]`` definition names a backend with no control channel: the broker
fills its endpoint template, passes it by ``{endpoint}`` and the environment, waits
for it by connecting, routes every client by reconnect (a client asking for a
handoff is told why not: ``backend_no_control_channel``), and stops it with SIGTERM.
One that never binds, or exits first, is a spawn failure within its ready timeout
and leaves no process behind. (The reference's own ServiceServer as a foreign
backend, ready by probe, is in ``tests/interop``.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

import rpbroker
from rpbroker.events import EventKind
from rpbroker.wire.codes import RefusalCode

from .support import Workspace, child_pids, round_trip, wait_for_event
from .test_e2e_supervision_helpers import pid_gone

FOREIGN_ECHO = Path(__file__).resolve().parent / "foreign_echo.py"


def add_foreign(
    workspace: Workspace, name: str, mode: str, *, ready: str = "connect", timeout: float = 20
) -> None:
    path = workspace.services / f"{name}.toml"
    path.write_text(
        f'service_name = "{name}"\n'
        f'command = ["{sys.executable}", "{FOREIGN_ECHO}", "{mode}", "{{endpoint}}"]\n'
        "[foreign]\n"
        'endpoint = "{runtime_dir}/{service}-{token}.sock"\n'
        f'ready = "{ready}"\n'
        f"ready_timeout_secs = {timeout}\n"
    )
    path.chmod(0o600)


async def test_a_foreign_backend_is_served_by_reconnect_and_stopped_by_sigterm(
    workspace: Workspace,
) -> None:
    add_foreign(workspace, "plain", "serve")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config()) as broker:
            async with rpbroker.connect("plain", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"hello foreign") == b"hello foreign"
                assert stream.route is rpbroker.Route.RECONNECT
            [backend] = list(broker.backends)
            assert not backend.has_control_channel
            endpoint = backend.endpoint
            assert Path(endpoint).parent == workspace.runtime
            assert Path(endpoint).name.startswith("plain-")
            pid = backend.pid
        events = broker.recent_events()
    skipped = [e for e in events if e.kind is EventKind.HANDOFF_SKIPPED]
    assert [e.details["fallback"] for e in skipped] == ["backend_no_control_channel"]
    [stopped] = [e for e in events if e.kind is EventKind.STOPPED]
    # Exit status 0: the backend's own SIGTERM handler ran (SIGKILL would be -9).
    assert stopped.details["status"] == 0
    assert stopped.details["cause"] == "broker-shutdown"
    assert pid_gone(pid) and pid not in child_pids()
    assert not os.path.lexists(endpoint)


@pytest.mark.parametrize(
    ("mode", "ready", "expected"),
    [
        ("never-ready", "connect", "not ready within 1 s (last readiness check: connect failed"),
        ("never-ready", "probe", "not ready within 1 s (last readiness check: probe unreachable"),
        ("exit", "connect", "exited with status 3 before becoming ready"),
    ],
)
async def test_a_foreign_backend_that_never_becomes_ready_is_a_spawn_failure_and_is_reaped(
    workspace: Workspace, mode: str, ready: str, expected: str
) -> None:
    add_foreign(workspace, "stuck", mode, ready=ready, timeout=1)
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config()) as broker:
            with pytest.raises(rpbroker.RefusedError) as refused:
                async with rpbroker.connect("stuck", "1.0.0", broker=broker.socket_path):
                    pass
            assert refused.value.code is RefusalCode.BACKEND_SPAWN_FAILED
            assert expected in str(refused.value)
            # The Hello is refused at the ready deadline; the event comes once it is reaped.
            await wait_for_event(broker, EventKind.SPAWN_FAILED)
            [failed] = [e for e in broker.recent_events() if e.kind is EventKind.SPAWN_FAILED]
            assert failed.pid != 0
            assert failed.details["failure"] == (
                "exited-before-ready" if mode == "exit" else "ready-timeout"
            )
            # Killed (unless it exited first) and reaped: no process, no zombie.
            assert pid_gone(failed.pid) and failed.pid not in child_pids()
            assert list(broker.backends) == []
