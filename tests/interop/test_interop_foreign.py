"""Interop (c): rpbroker brokers the reference's own ``ServiceServer`` as a foreign backend.

A real broker (``rpbroker.open_broker``) with a services directory holding one
``[foreign]`` definition whose command starts ``reference_service.py``: a
``running_process_service.ServiceServer`` from the ``running-process`` 4.10.17
wheel. The reference derives its endpoint itself (from its name, its runtime
directory and ``$XDG_RUNTIME_DIR``), so the definition names that fixed path.
The broker waits for it by the v1 endpoint probe (the reference answers 0xB232
itself; rpbroker's probe client verifies its identity), a client does
``rpbroker.connect()`` and exchanges frames with it on the reference's own lane;
SIGKILL makes the broker respawn it (the dead socket the reference leaves behind
is removed as provably ours and dead), and the broker's shutdown reaches it as
SIGTERM (its handler exits 0; SIGKILL would be -9).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from running_process_service import ServiceSpec

import rpbroker
from rpbroker.events import EventKind
from rpbroker.wire import FrameKind, decode_frame, framed, request
from rpbroker.wire.framing import read_frame_body
from tests.e2e.support import Workspace, child_pids, make_workspace, remove_tree
from tests.e2e.test_e2e_supervision_helpers import pid_gone, watch_events

REFERENCE_SERVICE = Path(__file__).resolve().parent / "reference_service.py"
NAME = "rpb-foreign"
#: The reference service's request lane (reference_service.PAYLOAD_PROTOCOL).
LANE = 0xF0B7


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, short ``$XDG_RUNTIME_DIR`` for the reference (its socket goes there)."""
    root = Path(tempfile.mkdtemp(prefix="rpx-", dir="/tmp"))
    root.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    try:
        yield root
    finally:
        remove_tree(root)


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    ws = make_workspace()
    try:
        yield ws
    finally:
        remove_tree(ws.root)


def add_reference_service(workspace: Workspace, xdg: Path) -> str:
    """Write the foreign definition; return the endpoint the reference will bind."""
    state = xdg / "state"
    endpoint: str = ServiceSpec(
        name=NAME, version="1.0.0", payload_protocol=LANE, runtime_dir=state
    ).endpoint
    path = workspace.services / f"{NAME}.toml"
    path.write_text(
        f'service_name = "{NAME}"\n'
        f'command = ["{sys.executable}", "{REFERENCE_SERVICE}", "{NAME}", "{state}"]\n'
        "[env]\n"
        f'XDG_RUNTIME_DIR = "{xdg}"\n'
        "[foreign]\n"
        f'endpoint = "{endpoint}"\n'
        'ready = "probe"\n'
        "ready_timeout_secs = 20\n"
    )
    path.chmod(0o600)
    return endpoint


async def exchange(broker: rpbroker.Broker, payload: bytes, request_id: int) -> None:
    """Connect through the broker and get the reference's ``pong:`` reply to one request."""
    async with rpbroker.connect(NAME, "1.0.0", broker=broker.socket_path) as stream:
        assert stream.route in (rpbroker.Route.RECONNECT, rpbroker.Route.HELLO_SKIP)
        await stream.send_all(framed(request(LANE, payload, request_id=request_id)))
        reply = decode_frame(await read_frame_body(stream))
    assert int(reply.kind) == FrameKind.RESPONSE
    assert reply.request_id == request_id
    assert reply.payload == b"pong:" + payload


def only_backend(broker: rpbroker.Broker) -> rpbroker.supervisor.Incarnation:
    [backend] = list(broker.backends)
    return backend


async def test_rpbroker_brokers_a_reference_service_server(workspace: Workspace, xdg: Path) -> None:
    endpoint = add_reference_service(workspace, xdg)
    config = workspace.config(recovery_backoff_s=0.05)
    with trio.fail_after(60):
        async with rpbroker.open_broker(config) as broker:
            await exchange(broker, b"ping", 7)
            first = only_backend(broker)
            assert first.endpoint == endpoint and not first.has_control_channel
            assert first.routable

            # Crash recovery: SIGKILL it; the broker respawns it with no client involved.
            async with watch_events(broker) as watch:
                os.kill(first.pid, signal.SIGKILL)
                running = await watch.wait_for(EventKind.RUNNING)
            assert running.pid not in (0, first.pid)
            assert watch.kinds(NAME) == [
                EventKind.CRASHED,
                EventKind.RETRYING,
                EventKind.SPAWNING,
                EventKind.RUNNING,
            ]
            await exchange(broker, b"again", 8)
            second = only_backend(broker)
            assert second.pid == running.pid
        events = broker.recent_events()
    # Shutdown: SIGTERM reached the reference (its handler exits 0, SIGKILL is -9).
    [stopped] = [e for e in events if e.kind is EventKind.STOPPED]
    assert stopped.pid == second.pid
    assert (stopped.details["status"], stopped.details["cause"]) == (0, "broker-shutdown")
    assert pid_gone(second.pid) and second.pid not in child_pids()
    assert pid_gone(first.pid) and first.pid not in child_pids()
    assert not os.path.lexists(endpoint)  # the reference removed it on SIGTERM
