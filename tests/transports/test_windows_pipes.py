"""Named-pipe listening, connecting, streams, security descriptors and peers, on fakes.

What this covers: CreateNamedPipeW flags (FIRST_PIPE_INSTANCE on the first
instance only, OVERLAPPED, REJECT_REMOTE_CLIENTS, byte mode) and the
current-user-only descriptor (exact SDDL, live during the call, LocalFree'd after);
pipe squatting as ``EndpointInUseError``; the accept flow on the IOCP
(register, ConnectNamedPipe, wait on the same OVERLAPPED, ERROR_PIPE_CONNECTED
without waiting, ERROR_NO_DATA skipped, next instance created, cancellation);
CreateFileW arguments and error mapping with the bounded busy retry; the stream's
EOF/broken mapping; the peer-identity call chain and its handle closing.

What it does not cover: real kernel behaviour of named pipes.
"""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from transports._interface import (
    EndpointInUseError,
    EndpointNameError,
    EndpointUnavailableError,
    FdExhaustedError,
    PeerIdentity,
    TransportError,
)
from transports._windows import WindowsTransport
from transports._windows_api import (
    ERROR_ACCESS_DENIED,
    ERROR_BROKEN_PIPE,
    ERROR_INVALID_PARAMETER,
    ERROR_NO_DATA,
    ERROR_NO_SYSTEM_RESOURCES,
    ERROR_PIPE_NOT_CONNECTED,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    FILE_FLAG_OVERLAPPED,
    GENERIC_READ,
    GENERIC_WRITE,
    OPEN_EXISTING,
    PIPE_ACCESS_DUPLEX,
    PIPE_REJECT_REMOTE_CLIENTS,
    PIPE_UNLIMITED_INSTANCES,
    PROCESS_QUERY_LIMITED_INFORMATION,
    SECURITY_IDENTIFICATION,
    SECURITY_SQOS_PRESENT,
    TOKEN_QUERY,
)
from transports._windows_pipes import PipeListener, connect_pipe
from transports._windows_security import owner_only_sddl
from transports._windows_stream import PipeStream

from .windows_fakes import DEFAULT_SID, FakeIo, FakeWindows

PATH = "\\\\.\\pipe\\rpb-v1-0123456789abcdef-shared"
PEER_PID = 6000
PEER_SID = "S-1-5-21-1-2-3-1002"


def _listener(fake: FakeWindows, io: FakeIo) -> PipeListener:
    return PipeListener(fake.api(), io, PATH, fake.sid)


def test_first_instance_flags_and_descriptor() -> None:
    fake = FakeWindows()
    _listener(fake, FakeIo())
    (create,) = fake.calls_to("CreateNamedPipeW")
    name, open_mode, pipe_mode, max_instances, *_ = create.args
    assert name == PATH
    assert open_mode == PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE
    assert pipe_mode == PIPE_REJECT_REMOTE_CLIENTS  # byte type, byte read mode, blocking
    assert max_instances == PIPE_UNLIMITED_INSTANCES
    assert create.extra["sddl"] == f"D:P(A;;GA;;;{DEFAULT_SID})"
    assert create.extra["descriptor_live"] is True
    assert create.extra["inherit"] == 0
    # Built just before the call, freed just after; nothing outstanding.
    assert fake.names() == [
        "ConvertStringSecurityDescriptorToSecurityDescriptorW",
        "CreateNamedPipeW",
        "LocalFree",
    ]
    assert fake.local_allocs == {}


def test_descriptor_is_freed_when_pipe_creation_fails() -> None:
    fake = FakeWindows()
    fake.fail("CreateNamedPipeW", ERROR_INVALID_PARAMETER)
    with pytest.raises(TransportError):
        _listener(fake, FakeIo())
    assert fake.names()[-1] == "LocalFree"
    assert fake.local_allocs == {}


def test_sddl_refuses_anything_but_a_sid() -> None:
    assert owner_only_sddl("S-1-5-18") == "D:P(A;;GA;;;S-1-5-18)"
    with pytest.raises(TransportError):
        owner_only_sddl("S-1-5-18)(A;;GA;;;WD")


def test_squatted_name_is_endpoint_in_use() -> None:
    fake = FakeWindows()
    fake.foreign_pipes.add(PATH)
    with pytest.raises(EndpointInUseError, match="already exists"):
        _listener(fake, FakeIo())
    assert fake.local_allocs == {}


def test_resource_exhaustion_is_fd_exhausted() -> None:
    fake = FakeWindows()
    fake.fail("CreateNamedPipeW", ERROR_NO_SYSTEM_RESOURCES)
    with pytest.raises(FdExhaustedError):
        _listener(fake, FakeIo())


def test_listener_refuses_a_path_outside_the_pipe_namespace() -> None:
    with pytest.raises(EndpointNameError):
        PipeListener(FakeWindows().api(), FakeIo(), "C:\\temp\\sock", DEFAULT_SID)


async def test_accept_waits_on_the_iocp_then_creates_the_next_instance() -> None:
    fake = FakeWindows()
    io = FakeIo()
    listener = _listener(fake, io)
    first = fake.calls_to("CreateNamedPipeW")[0]
    first_handle = fake.pipes[PATH][0]

    stream = await listener.accept()

    assert isinstance(stream, PipeStream) and stream.handle == first_handle
    assert stream.server_end
    assert io.registered == [first_handle]  # registered before ConnectNamedPipe
    (connect,) = fake.calls_to("ConnectNamedPipe")
    assert connect.args[0] == first_handle
    assert io.waits == [(first_handle, connect.extra["overlapped_address"])]
    second = fake.calls_to("CreateNamedPipeW")[1]
    assert second.int_arg(1) == first.int_arg(1) & ~FILE_FLAG_FIRST_PIPE_INSTANCE
    assert second.extra["sddl"] == first.extra["sddl"]
    assert len(fake.pipes[PATH]) == 2
    await stream.aclose()
    await listener.aclose()
    assert fake.open_handles() == []


async def test_already_connected_client_needs_no_wait() -> None:
    fake = FakeWindows()
    io = FakeIo()
    listener = _listener(fake, io)
    fake.handles[fake.pipes[PATH][0]].client_pid = PEER_PID  # connected before we asked
    stream = await listener.accept()
    assert io.waits == []
    await stream.aclose()
    await listener.aclose()


async def test_client_that_hung_up_is_skipped() -> None:
    fake = FakeWindows()
    io = FakeIo()
    listener = _listener(fake, io)
    dead = fake.pipes[PATH][0]
    fake.connect_results.append(ERROR_NO_DATA)
    stream = await listener.accept()
    assert dead in fake.closed
    assert isinstance(stream, PipeStream) and stream.handle != dead
    await stream.aclose()
    await listener.aclose()


async def test_cancelled_accept_replaces_the_instance_before_closing_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeWindows()
    io = FakeIo()
    io.wait_gate = trio.Event()
    listener = _listener(fake, io)
    old = fake.pipes[PATH][0]
    with trio.move_on_after(1):
        await listener.accept()
    assert old in fake.closed
    assert len(fake.pipes[PATH]) == 1  # the name never went away
    create_index = max(i for i, c in enumerate(fake.calls) if c.name == "CreateNamedPipeW")
    close_index = next(
        i for i, c in enumerate(fake.calls) if c.name == "CloseHandle" and c.args == (old,)
    )
    assert create_index < close_index
    await listener.aclose()
    await listener.aclose()  # idempotent
    assert fake.open_handles() == []
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_connect_arguments_and_stream() -> None:
    fake = FakeWindows()
    io = FakeIo()
    listener = _listener(fake, io)
    stream = await connect_pipe(fake.api(), io, PATH)
    (create,) = fake.calls_to("CreateFileW")
    assert create.args == (
        PATH,
        GENERIC_READ | GENERIC_WRITE,
        0,
        None,
        OPEN_EXISTING,
        FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
        None,
    )
    assert not stream.server_end
    assert io.registered == [stream.handle]
    await stream.aclose()
    await listener.aclose()


async def test_connect_to_missing_pipe_is_unavailable() -> None:
    fake = FakeWindows()
    with pytest.raises(EndpointUnavailableError, match="no such pipe"):
        await connect_pipe(fake.api(), FakeIo(), PATH)


async def test_connect_access_denied_is_a_transport_error() -> None:
    fake = FakeWindows()
    fake.fail("CreateFileW", ERROR_ACCESS_DENIED)
    with pytest.raises(TransportError, match="another user") as info:
        await connect_pipe(fake.api(), FakeIo(), PATH)
    assert not isinstance(info.value, EndpointUnavailableError)


async def test_busy_pipe_is_retried_then_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeWindows()
    io = FakeIo()
    listener = _listener(fake, io)
    fake.busy[PATH] = 5
    stream = await connect_pipe(fake.api(), io, PATH)
    assert len(fake.calls_to("CreateFileW")) == 6
    await stream.aclose()
    await listener.aclose()


async def test_pipe_busy_for_too_long_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeWindows()
    fake.pipes[PATH] = []
    fake.busy[PATH] = 10**6
    start = trio.current_time()
    with pytest.raises(EndpointUnavailableError, match="busy"):
        await connect_pipe(fake.api(), FakeIo(), PATH, busy_timeout_s=2.0)
    assert trio.current_time() - start == pytest.approx(2.0)


@pytest.mark.parametrize("code", [ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, ERROR_NO_DATA])
async def test_read_after_peer_left_is_end_of_stream(code: int) -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-client", server_pid=1)
    stream = PipeStream(fake.api(), io, handle, server_end=False)
    io.feed(handle, b"hello")
    io.feed(handle, code)
    assert await stream.receive_some(3) == b"hel"
    assert await stream.receive_some() == b"lo"
    assert await stream.receive_some() == b""
    await stream.aclose()
    assert fake.closed == [handle]
    await stream.aclose()
    assert fake.closed == [handle]  # closed exactly once
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


async def test_write_to_a_gone_peer_is_broken() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-client", server_pid=1)
    stream = PipeStream(fake.api(), io, handle, server_end=False)
    await stream.send_all(b"ok")
    io.write_errors.append(ERROR_NO_DATA)
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"gone")
    assert bytes(io.written[handle]) == b"ok"
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


def test_peer_identity_call_chain_closes_every_handle() -> None:
    fake = FakeWindows()
    fake.add_process(PEER_PID, PEER_SID)
    transport = WindowsTransport(fake.api(), FakeIo())
    handle = fake.new_handle("pipe-server", client_pid=PEER_PID, server_pid=fake.pid)
    stream = PipeStream(fake.api(), FakeIo(), handle, server_end=True)

    assert transport.peer_identity(stream) == PeerIdentity(pid=PEER_PID, user=PEER_SID)

    assert fake.names() == [
        "GetNamedPipeClientProcessId",
        "OpenProcess",
        "OpenProcessToken",
        "GetTokenInformation",
        "GetTokenInformation",
        "ConvertSidToStringSidW",
        "LocalFree",
        "CloseHandle",
        "CloseHandle",
    ]
    assert fake.calls_to("OpenProcess")[0].args == (
        PROCESS_QUERY_LIMITED_INFORMATION,
        0,
        PEER_PID,
    )
    (open_token,) = fake.calls_to("OpenProcessToken")
    assert open_token.args[0] == fake.calls_to("OpenProcess")[0].extra["handle"]
    assert open_token.args[1] == TOKEN_QUERY
    # The token first, then the process.
    assert fake.closed == [open_token.extra["handle"], open_token.args[0]]
    assert fake.open_handles() == [handle]
    assert fake.local_allocs == {}


def test_peer_identity_closes_the_process_when_the_token_fails() -> None:
    fake = FakeWindows()
    fake.add_process(PEER_PID, PEER_SID)
    handle = fake.new_handle("pipe-server", client_pid=PEER_PID)
    stream = PipeStream(fake.api(), FakeIo(), handle, server_end=True)
    fake.fail("OpenProcessToken", ERROR_ACCESS_DENIED)
    with pytest.raises(TransportError, match=str(PEER_PID)):
        WindowsTransport(fake.api(), FakeIo()).peer_identity(stream)
    assert fake.open_handles() == [handle]


def test_peer_identity_of_a_client_end_asks_for_the_server_pid() -> None:
    fake = FakeWindows()
    fake.add_process(PEER_PID, PEER_SID)
    handle = fake.new_handle("pipe-client", server_pid=PEER_PID)
    stream = PipeStream(fake.api(), FakeIo(), handle, server_end=False)
    identity = WindowsTransport(fake.api(), FakeIo()).peer_identity(stream)
    assert identity == PeerIdentity(pid=PEER_PID, user=PEER_SID)
    assert fake.names()[0] == "GetNamedPipeServerProcessId"


def test_peer_identity_refuses_other_streams() -> None:
    left, _ = trio.testing.memory_stream_pair()
    with pytest.raises(TransportError, match="named-pipe"):
        WindowsTransport(FakeWindows().api(), FakeIo()).peer_identity(left)


def test_stream_whose_registration_fails_leaves_the_handle_to_the_caller() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-client", server_pid=1)
    io.register_errors.append(ERROR_INVALID_PARAMETER)
    try:
        PipeStream(fake.api(), io, handle, server_end=False)
    except OSError:
        pass
    else:
        pytest.fail("registration should have failed")
    gc.collect()  # the half-built stream is gone and must not have closed the handle
    assert fake.calls_to("CloseHandle") == []
    assert handle in fake.handles
