"""Connection passing on Windows: the DuplicateHandle sequence and leak contract (facts §3.7).

What this covers, against a fake kernel32: the exact call sequence and arguments
(OpenProcess(PROCESS_DUP_HANDLE, FALSE, pid); DuplicateHandle from the current
process with access 0, no inheritance and DUPLICATE_SAME_ACCESS, never
DUPLICATE_CLOSE_SOURCE; CloseHandle of the target process in every case), the
error mapping table, the receipt and the leaked handle reported after a failed
offer send, and the receiver's adoption of a handle value.

What it does not cover: a real second process receiving a real handle.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from transports._interface import ConnectionPassError, PassFailure, PassReceipt
from transports._windows_api import (
    DUPLICATE_CLOSE_SOURCE,
    DUPLICATE_SAME_ACCESS,
    ERROR_ACCESS_DENIED,
    ERROR_BROKEN_PIPE,
    ERROR_INVALID_PARAMETER,
    ERROR_NOT_ENOUGH_MEMORY,
    INVALID_HANDLE_VALUE,
    PROCESS_DUP_HANDLE,
    Win32Api,
)
from transports._windows_channel import PipeControlChannel, frame_header
from transports._windows_passing import adopt_pipe_handle, duplicate_into_process
from transports._windows_stream import PipeStream

from .windows_fakes import FakeIo, FakeWindows

BACKEND_PID = 5120
TOKEN = bytes(range(16))


@pytest.fixture
def fake() -> FakeWindows:
    fake = FakeWindows()
    fake.add_process(BACKEND_PID, fake.sid)
    return fake


@pytest.fixture
def api(fake: FakeWindows) -> Win32Api:
    return fake.api()


def _client_connection(fake: FakeWindows) -> int:
    return fake.new_handle("pipe-server", client_pid=9000, server_pid=fake.pid)


def test_success_sequence_and_arguments(fake: FakeWindows, api: Win32Api) -> None:
    source = _client_connection(fake)
    receipt = duplicate_into_process(api, source, BACKEND_PID)

    assert fake.names() == ["OpenProcess", "GetCurrentProcess", "DuplicateHandle", "CloseHandle"]
    (open_call,) = fake.calls_to("OpenProcess")
    assert open_call.args == (PROCESS_DUP_HANDLE, 0, BACKEND_PID)
    (dup,) = fake.calls_to("DuplicateHandle")
    source_process, source_handle, target_process, _out, access, inherit, options = dup.args
    assert source_process == INVALID_HANDLE_VALUE  # GetCurrentProcess() pseudo-handle
    assert source_handle == source
    assert fake.closed == [target_process]  # the process handle, and only it
    assert (access, inherit) == (0, 0)
    assert options == DUPLICATE_SAME_ACCESS
    assert not options & DUPLICATE_CLOSE_SOURCE
    # The broker keeps its own handle; the receipt names the receiver's copy.
    assert source in fake.handles
    assert receipt == PassReceipt(handle_value=0x2000, duplicated_handle=0x2000)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (ERROR_ACCESS_DENIED, PassFailure.PERMISSION_DENIED),
        (ERROR_INVALID_PARAMETER, PassFailure.BACKEND_UNAVAILABLE),
        (ERROR_NOT_ENOUGH_MEMORY, PassFailure.BACKEND_UNAVAILABLE),
    ],
)
def test_open_process_failure_mapping(
    fake: FakeWindows, api: Win32Api, code: int, kind: PassFailure
) -> None:
    fake.fail("OpenProcess", code)
    with pytest.raises(ConnectionPassError) as info:
        duplicate_into_process(api, _client_connection(fake), BACKEND_PID)
    assert info.value.kind is kind
    assert info.value.os_error == code
    assert info.value.leaked_handle is None
    assert not info.value.fd_may_have_reached_backend
    assert fake.names() == ["OpenProcess"]  # nothing to close, nothing duplicated


def test_exited_backend_is_unavailable(fake: FakeWindows, api: Win32Api) -> None:
    with pytest.raises(ConnectionPassError) as info:
        duplicate_into_process(api, _client_connection(fake), 4242)  # no such process
    assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE


def test_unknown_pid_is_refused_before_any_call(fake: FakeWindows, api: Win32Api) -> None:
    with pytest.raises(ConnectionPassError) as info:
        duplicate_into_process(api, _client_connection(fake), 0)
    assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
    assert fake.calls == []


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (ERROR_ACCESS_DENIED, PassFailure.PERMISSION_DENIED),
        (ERROR_INVALID_PARAMETER, PassFailure.FAILED),
        (ERROR_NOT_ENOUGH_MEMORY, PassFailure.FAILED),
    ],
)
def test_duplicate_failure_mapping_still_closes_the_target(
    fake: FakeWindows, api: Win32Api, code: int, kind: PassFailure
) -> None:
    fake.fail("DuplicateHandle", code)
    with pytest.raises(ConnectionPassError) as info:
        duplicate_into_process(api, _client_connection(fake), BACKEND_PID)
    assert info.value.kind is kind
    assert info.value.os_error == code
    assert info.value.leaked_handle is None
    assert fake.names()[-1] == "CloseHandle"
    target_process = fake.calls_to("DuplicateHandle")[0].args[2]
    assert fake.closed == [target_process]
    assert fake.open_handles("process") == []


@pytest.mark.parametrize("result", [0, INVALID_HANDLE_VALUE])
def test_null_or_invalid_duplicate_is_failed(fake: FakeWindows, api: Win32Api, result: int) -> None:
    fake.duplicate_results.append(result)
    with pytest.raises(ConnectionPassError) as info:
        duplicate_into_process(api, _client_connection(fake), BACKEND_PID)
    assert info.value.kind is PassFailure.FAILED
    assert info.value.os_error is None
    assert fake.open_handles("process") == []


def _channel(fake: FakeWindows, io: FakeIo) -> tuple[PipeControlChannel, int]:
    api = fake.api()
    handle = fake.new_handle("pipe-server", client_pid=BACKEND_PID, server_pid=fake.pid)
    stream = PipeStream(api, io, handle, server_end=True)
    return PipeControlChannel(api, io, stream, peer_pid=BACKEND_PID), handle


def _offer(receipt: PassReceipt) -> bytes:
    body = receipt.handle_value.to_bytes(4, "little")
    return frame_header(len(body)) + body


async def test_pass_then_send_duplicates_before_building_the_offer(fake: FakeWindows) -> None:
    io = FakeIo()
    channel, control = _channel(fake, io)
    client = PipeStream(fake.api(), io, _client_connection(fake), server_end=True)
    seen: list[PassReceipt] = []

    def build(receipt: PassReceipt) -> bytes:
        assert fake.names()[-1] == "CloseHandle"  # duplication is complete
        seen.append(receipt)
        return _offer(receipt)

    receipt = await channel.pass_connection_then_send(client, TOKEN, build)
    assert seen == [receipt]
    assert bytes(io.written[control]) == _offer(receipt)
    assert not client.closed  # the caller still owns and closes its copy
    # ... but may no longer do I/O on it: the backend can detach it from our IOCP.
    assert client.handed_off
    with pytest.raises(trio.BrokenResourceError, match="handed to another process"):
        await client.send_all(b"late")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    await client.aclose()
    assert client.closed


async def test_offer_send_failure_reports_the_leaked_duplicate(fake: FakeWindows) -> None:
    io = FakeIo()
    channel, _ = _channel(fake, io)
    client = PipeStream(fake.api(), io, _client_connection(fake), server_end=True)
    io.write_errors.append(ERROR_BROKEN_PIPE)
    with pytest.raises(ConnectionPassError) as info:
        await channel.pass_connection_then_send(client, TOKEN, _offer)
    assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
    assert info.value.fd_may_have_reached_backend
    assert info.value.leaked_handle == 0x2000
    assert not client.handed_off  # the offer never left: the peer cannot adopt it


async def test_offer_builder_failure_reports_the_leaked_duplicate(fake: FakeWindows) -> None:
    io = FakeIo()
    channel, _ = _channel(fake, io)
    client = PipeStream(fake.api(), io, _client_connection(fake), server_end=True)

    def broken(receipt: PassReceipt) -> bytes:
        raise ValueError("cannot encode")

    with pytest.raises(ConnectionPassError) as info:
        await channel.pass_connection_then_send(client, TOKEN, broken)
    assert info.value.kind is PassFailure.FAILED
    assert info.value.leaked_handle == 0x2000
    assert isinstance(info.value.__cause__, ValueError)


async def test_cancelled_offer_send_records_the_leak(
    fake: FakeWindows, autojump_clock: trio.testing.MockClock
) -> None:
    io = FakeIo()
    io.write_gate = trio.Event()  # the write never completes
    channel, _ = _channel(fake, io)
    client = PipeStream(fake.api(), io, _client_connection(fake), server_end=True)
    with trio.move_on_after(1):
        await channel.pass_connection_then_send(client, TOKEN, _offer)
    assert channel.leaked_handles == [0x2000]


async def test_bad_token_or_foreign_stream_fails_before_duplicating(fake: FakeWindows) -> None:
    io = FakeIo()
    channel, _ = _channel(fake, io)
    client = PipeStream(fake.api(), io, _client_connection(fake), server_end=True)
    with pytest.raises(ConnectionPassError) as info:
        await channel.pass_connection(client, b"short")
    assert info.value.kind is PassFailure.FAILED
    left, _right = trio.testing.memory_stream_pair()
    with pytest.raises(ConnectionPassError):
        await channel.pass_connection(left, TOKEN)
    assert fake.calls_to("OpenProcess") == []


def test_adopt_detaches_registers_and_keeps_the_token() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-server", client_pid=9000, server_pid=1234)
    passed = adopt_pipe_handle(fake.api(), io, handle, TOKEN)
    assert passed is not None
    assert passed.token == TOKEN
    assert isinstance(passed.stream, PipeStream) and passed.stream.handle == handle
    assert fake.names() == ["NtSetInformationFile"]
    assert io.registered == [handle]  # after detaching from the sender's port
    assert "redacted" in repr(passed)


@pytest.mark.parametrize("value", [0, -4, INVALID_HANDLE_VALUE, 1 << 40])
def test_adopt_refuses_impossible_handle_values(value: int) -> None:
    fake = FakeWindows()
    assert adopt_pipe_handle(fake.api(), FakeIo(), value, TOKEN) is None
    assert fake.calls == []


def test_adopt_failure_closes_the_handle_and_returns_none() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-server", client_pid=9000)
    io.register_errors.append(ERROR_INVALID_PARAMETER)
    assert adopt_pipe_handle(fake.api(), io, handle, TOKEN) is None
    assert fake.closed == [handle]
