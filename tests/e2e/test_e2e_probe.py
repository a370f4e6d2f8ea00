"""The endpoint probe with real processes and sockets: SDK replies, probe client, Hello-skip."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
import transports
from rpbroker import client as client_module
from rpbroker import wire
from rpbroker.endpoint_cache import EndpointCache, EndpointCheck
from rpbroker.identity import IdentityCheck, file_blake3, local_identity
from rpbroker.probe_client import EndpointProbeError, ProbeFailure, probe_endpoint
from rpbroker.wire import parse_probe_reply, probe_reply_frame, probe_request_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body

from .support import Workspace, read_exactly, round_trip

NONCE = bytes(range(200, 232))
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


async def first_endpoint(broker: rpbroker.Broker) -> tuple[str, int]:
    async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
        endpoint = stream.endpoint
    return endpoint, next(iter(broker.backends)).pid


async def test_sdk_answers_the_reference_form_with_the_reference_identity(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(20):
        endpoint, pid = await first_endpoint(broker)
        request = probe_request_frame(NONCE)
        # request_id = the first 8 nonce bytes (here >= 2**63: a 10-byte varint)
        assert len(request) == 5 + 51
        stream = await transports.connect(endpoint)
        async with stream:
            await stream.send_all(request)
            body = await read_frame_body(stream, MAX_FRAME_BYTES)
            assert await stream.receive_some(1) == b""
    reply = wire.decode_frame(body)
    assert reply.request_id == int.from_bytes(NONCE[:8], "little")
    identity = parse_probe_reply(body, NONCE, request_id=reply.request_id)
    exe = os.readlink(f"/proc/{pid}/exe")
    assert identity.pid == pid
    assert identity.exe_path == exe  # the real executable, not the venv's symlink
    assert identity.exe_hash_algorithm == "blake3"
    assert identity.exe_hash == file_blake3(exe)
    assert identity.boot_id == Path(BOOT_ID_PATH).read_text().strip()
    assert identity.ipc_endpoint.path == endpoint
    assert identity.started_at_unix_ms > 0


async def test_probe_client_verifies_a_real_backend(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        endpoint, pid = await first_endpoint(broker)
        identity = await probe_endpoint(endpoint)
        assert identity.pid == pid
        again = await probe_endpoint(endpoint, recorded=identity)
        assert again == identity
        stale = wire.DaemonProcess()
        stale.CopyFrom(identity)
        stale.pid = identity.pid + 1
        with pytest.raises(EndpointProbeError) as caught:
            await probe_endpoint(endpoint, recorded=stale)
    assert caught.value.check is IdentityCheck.RECORDED


async def test_a_client_that_sends_one_probe_like_byte_and_waits_gets_its_echo(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(20):
        endpoint, _pid = await first_endpoint(broker)
        stream = await transports.connect(endpoint)
        async with stream:
            assert await round_trip(stream, b"\x01") == b"\x01"
            header_like = b"\x01\x2a\x00\x00\x00"  # a probe header, then a pause
            assert await round_trip(stream, header_like) == header_like


# -- a probe responder the test controls ----------------------------------------------


Answer = Callable[[wire.Frame], bytes | None]


@asynccontextmanager
async def responder(workspace: Workspace, answer: Answer) -> AsyncIterator[str]:
    """An endpoint that reads one frame per connection and writes ``answer(frame)``."""
    path = str(workspace.runtime / "fake-backend.sock")
    listener = await transports.open_listener(path)

    async def serve(stream: trio.abc.Stream) -> None:
        async with stream:
            body = await read_frame_body(stream, MAX_FRAME_BYTES)
            reply = answer(wire.decode_frame(body))
            if reply is None:
                await trio.sleep_forever()
            await stream.send_all(reply)

    async def accept_loop() -> None:
        async with trio.open_nursery() as conns:
            while True:
                conns.start_soon(serve, await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop)
        try:
            yield path
        finally:
            nursery.cancel_scope.cancel()
            await listener.aclose()


def honest(path: str) -> wire.DaemonProcess:
    return local_identity(wire.Endpoint(namespace_id="t", path=path), started_at_unix_ms=1)


@pytest.mark.parametrize(
    ("mutate", "check"),
    [
        (lambda i: setattr(i, "exe_hash", bytes(32)), IdentityCheck.EXE_HASH),
        (lambda i: setattr(i, "exe_hash_algorithm", "sha256"), IdentityCheck.HASH_ALGORITHM),
        (lambda i: setattr(i, "exe_hash", bytes(31)), IdentityCheck.HASH_LENGTH),
        (lambda i: setattr(i, "exe_path", "/bin/sh"), IdentityCheck.EXE_PATH),
        (lambda i: setattr(i, "boot_id", "another-boot"), IdentityCheck.BOOT_ID),
        (lambda i: setattr(i.ipc_endpoint, "path", "/elsewhere"), IdentityCheck.ENDPOINT),
        (lambda i: setattr(i, "pid", 0), IdentityCheck.PID),
        (lambda i: setattr(i, "pid", 2**31 - 2), IdentityCheck.PROCESS),
    ],
    ids=["hash", "algorithm", "hash-length", "exe", "boot", "endpoint", "pid-0", "gone"],
)
async def test_probe_client_rejects_a_false_identity(
    workspace: Workspace, mutate: Callable[[wire.DaemonProcess], None], check: IdentityCheck
) -> None:
    def answer(request: wire.Frame) -> bytes:
        identity = honest(path)
        mutate(identity)
        return probe_reply_frame(request, identity)

    with trio.fail_after(20):
        async with responder(workspace, answer) as path:
            with pytest.raises(EndpointProbeError) as caught:
                await probe_endpoint(path)
    assert caught.value.failure is ProbeFailure.IDENTITY
    assert caught.value.check is check


async def test_probe_client_accepts_the_honest_responder(workspace: Workspace) -> None:
    with trio.fail_after(20):
        async with responder(workspace, lambda r: probe_reply_frame(r, honest(path))) as path:
            assert (await probe_endpoint(path)).pid == os.getpid()


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: wire.framed(wire.response_to(r, bytes(32))),  # another nonce
        lambda r: wire.framed(wire.response_to(wire.request(0xB232, b"", request_id=1), b"")),
        lambda r: b"\x02garbage",
    ],
    ids=["nonce", "request-id", "framing"],
)
async def test_probe_client_rejects_a_bad_reply(workspace: Workspace, answer: Answer) -> None:
    with trio.fail_after(20):
        async with responder(workspace, answer) as path:
            with pytest.raises(EndpointProbeError) as caught:
                await probe_endpoint(path)
    assert caught.value.failure is ProbeFailure.BAD_REPLY


async def test_probe_client_gives_up_after_500_ms(
    workspace: Workspace, autojump_clock: trio.testing.MockClock
) -> None:
    async with responder(workspace, lambda r: None) as path:
        started = trio.current_time()
        with pytest.raises(EndpointProbeError) as caught:
            await probe_endpoint(path)
        assert trio.current_time() - started == pytest.approx(0.5, abs=1e-6)
    assert caught.value.failure is ProbeFailure.TIMEOUT


async def test_probe_client_reports_an_unreachable_endpoint(workspace: Workspace) -> None:
    with pytest.raises(EndpointProbeError) as caught:
        await probe_endpoint(str(workspace.runtime / "nobody.sock"))
    assert caught.value.failure is ProbeFailure.UNREACHABLE


# -- Hello-skip -------------------------------------------------------------------------


def spy_on_probes(monkeypatch: pytest.MonkeyPatch, *, fail: bool) -> list[str]:
    """Record every endpoint the client probes; the probe is real, or always fails."""
    probed: list[str] = []

    async def spy(endpoint: str) -> wire.DaemonProcess:
        probed.append(endpoint)
        if fail:
            raise EndpointProbeError(endpoint, ProbeFailure.IDENTITY, "test")
        return await probe_endpoint(endpoint)

    monkeypatch.setattr(client_module, "probe_endpoint", spy)
    return probed


async def test_hello_skip_verifies_each_cache_entry_once(
    broker: rpbroker.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed = spy_on_probes(monkeypatch, fail=False)
    cache = EndpointCache()
    key = (broker.socket_path, "echo", "1.0.0")
    routes = []
    with trio.fail_after(20):
        for _ in range(4):
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, endpoint_cache=cache
            ) as stream:
                routes.append(stream.route)
                assert await round_trip(stream, b"x") == b"x"
    assert routes[0] is rpbroker.Route.HANDOFF
    assert routes[1:] == [rpbroker.Route.HELLO_SKIP] * 3
    entry = cache.get(key)
    assert entry is not None
    assert probed == [entry.endpoint]
    assert entry.check is EndpointCheck.VERIFIED


async def test_hello_skip_refuses_an_endpoint_whose_identity_fails(
    broker: rpbroker.Broker, echo_workspace: Workspace
) -> None:
    received: list[bytes] = []

    def impostor(request: wire.Frame) -> bytes:
        received.append(bytes(request.payload))
        identity = honest(path)
        identity.exe_hash = bytes(32)
        return probe_reply_frame(request, identity)

    cache = EndpointCache()
    key = (broker.socket_path, "echo", "1.0.0")
    with trio.fail_after(20):
        async with responder(echo_workspace, impostor) as path:
            cache.remember(key, path)
            async with rpbroker.connect(
                "echo",
                "1.0.0",
                broker=broker.socket_path,
                endpoint_cache=cache,
                initial_data=b"secret",
            ) as stream:
                assert stream.route is not rpbroker.Route.HELLO_SKIP
                assert stream.endpoint != path
                assert await read_exactly(stream, 6) == b"secret"
    assert len(received) == 1 and len(received[0]) == 32  # one probe, no application bytes
    entry = cache.get(key)
    assert entry is not None
    assert entry.endpoint == stream.endpoint
    assert entry.check is EndpointCheck.UNVERIFIED


async def test_a_refused_endpoint_is_not_probed_again(
    broker: rpbroker.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed = spy_on_probes(monkeypatch, fail=True)
    cache = EndpointCache()
    with trio.fail_after(20):
        for _ in range(3):
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, endpoint_cache=cache
            ) as stream:
                assert stream.route is not rpbroker.Route.HELLO_SKIP
    entry = cache.get((broker.socket_path, "echo", "1.0.0"))
    assert entry is not None and entry.check is EndpointCheck.REFUSED
    assert probed == [entry.endpoint]
