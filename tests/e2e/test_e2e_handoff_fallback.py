"""Handoff fallback at every stage, with real misbehaving backend processes.

Whatever the backend does, the client ends with a working connection or a typed
error, data is never delivered twice, and the broker ends with no pending token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import rpbroker
from rpbroker.events import EventKind

from .support import Workspace, read_exactly, round_trip

FAST = {"ack_deadline_s": 1.0, "handoff_adopt_window_s": 0.5}


@pytest.mark.parametrize(
    ("mode", "stage"),
    [("reject", "await-ack"), ("never-ack", "await-ack"), ("forged-ack", "await-ack")],
)
async def test_misbehaving_backend_falls_back_to_reconnect(
    workspace: Workspace, mode: str, stage: str
) -> None:
    counter = workspace.root / "received"
    workspace.add_service("svc", mode=mode, env={"RPB_TEST_COUNTER": str(counter)})
    async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
        with trio.fail_after(30):
            async with rpbroker.connect(
                "svc", "1.0.0", broker=broker.socket_path, initial_data=b"request-1"
            ) as stream:
                assert stream.route is rpbroker.Route.RECONNECT
                assert await round_trip(stream, b"") == b""
                assert await stream.receive_some(9) == b"request-1"
                assert await round_trip(stream, b"+more") == b"+more"
            await broker.wait_connections_closed()
            # Exactly once: the handed-off copy of request-1 was never served.
            assert counter.read_bytes() == b"request-1+more"
            fallbacks = [e for e in broker.recent_events() if e.kind is EventKind.HANDOFF_FALLBACK]
            assert [e.details["stage"] for e in fallbacks] == [stage]
            assert fallbacks[0].details["fd_reached_backend"] is True
            assert len(broker.handoff.acks) == 0
            assert broker.handoff.tokens.pending_count == 0


async def test_backend_dying_with_the_fd_gives_a_working_route_or_a_typed_error(
    workspace: Workspace,
) -> None:
    workspace.add_service("svc", mode="die-on-offer")
    async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
        with trio.fail_after(30):
            try:
                async with rpbroker.connect(
                    "svc", "1.0.0", broker=broker.socket_path, initial_data=b"x"
                ) as stream:
                    assert stream.route is rpbroker.Route.RECONNECT
                    await stream.send_all(b"y")
                    assert await read_exactly(stream, 2) == b"xy"
            except (rpbroker.BackendUnavailableError, rpbroker.RefusedError) as exc:
                if isinstance(exc, rpbroker.RefusedError):
                    assert exc.code in (
                        rpbroker.RefusalCode.BACKEND_SPAWN_FAILED,
                        rpbroker.RefusalCode.RATE_LIMITED,
                    )
            except trio.BrokenResourceError:
                # The client reached the endpoint in the instant the dying
                # backend's listener was still open; the kernel then reset it.
                pass
            await broker.wait_connections_closed()
            assert len(broker.handoff.acks) == 0
            assert broker.handoff.tokens.pending_count == 0
            # The broker notices the backend's death, possibly only after the
            # client already has its answer. No checkpoint between the look at the
            # log and the subscription, so the event cannot slip between them.
            if not any(e.kind is EventKind.CRASHED for e in broker.recent_events()):
                async for event in broker.iter_events():
                    if event.kind is EventKind.CRASHED:
                        break


async def test_replayed_token_is_refused_by_the_backend(
    workspace: Workspace, tmp_path: Path
) -> None:
    # The SDK backend remembers consumed tokens: a second offer with the same
    # token must be refused, and the client must still be served by reconnect.
    from rpbroker.backends import BackendHandle
    from rpbroker.policy.tokens import HandoffToken

    workspace.add_service("echo")
    async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
        with trio.fail_after(30):
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as first:
                assert first.route is rpbroker.Route.HANDOFF
                token = bytes(first.negotiated.handle_passed_token) if first.negotiated else b""
            handle: BackendHandle = next(iter(broker.backends))
            replay = HandoffToken(token)
            broker.handoff.acks.register(replay, handle.ref, trio.current_time())
            a, b = trio.socket.socketpair()
            client_side = trio.SocketStream(a)
            broker_side = trio.SocketStream(b)
            outcome = await broker.handoff.attempt(broker_side, handle, replay, 999, b"")
            await broker_side.aclose()
            assert outcome.__class__.__name__ == "HandoffFellBack"
            assert "not pending" in outcome.detail  # type: ignore[union-attr]
            assert outcome.backend_rejected  # type: ignore[union-attr]
            # The backend told the client itself before closing its copy.
            data = await client_side.receive_some(4096)
            assert data.startswith(b"\x01")
            await client_side.aclose()
        assert len(broker.handoff.acks) == 0


async def test_handoff_disabled_by_service_uses_reconnect(workspace: Workspace) -> None:
    workspace.add_service("plain", handoff=False)
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(20):
            async with rpbroker.connect("plain", "1.0.0", broker=broker.socket_path) as stream:
                assert stream.route is rpbroker.Route.RECONNECT
                assert stream.negotiated is not None
                assert stream.negotiated.server_capabilities == 0
                assert await round_trip(stream, b"ok") == b"ok"
        assert not [e for e in broker.recent_events() if e.kind is EventKind.HANDOFF_FALLBACK]


async def test_failed_attempts_are_rate_limited_per_backend(workspace: Workspace) -> None:
    workspace.add_service("svc", mode="reject")
    async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
        with trio.fail_after(60):
            for _ in range(10):
                async with rpbroker.connect(
                    "svc", "1.0.0", broker=broker.socket_path, hello_skip=False
                ) as stream:
                    assert stream.route is rpbroker.Route.RECONNECT
        fallbacks = [e for e in broker.recent_events() if e.kind is EventKind.HANDOFF_FALLBACK]
        # 8 failures per 30 s window, then the broker stops offering handoffs.
        assert len(fallbacks) == 8
