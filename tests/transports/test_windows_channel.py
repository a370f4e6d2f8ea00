"""The Windows control channel: frame boundaries, the inherited pipe, serialized sends.

What this covers: ``FrameReader`` splitting a byte stream into v1 frames whatever
the chunking, refusing a bad framing byte or an oversize length before reading the
body, telling end-of-stream at a boundary from end-of-stream mid-frame, and
keeping partial frames across a cancelled read; ``create_control_pair``'s pipe
(random ``-ctl-`` name, one instance, first-instance flag, client end opened at
once, connection confirmed, only the server end on the IOCP); the child side
parsing ``handle:<n>``; concurrent senders never interleaving.

What it does not cover: a real child inheriting a real handle.
"""

from __future__ import annotations

import os
import re

import pytest
import trio
import trio.testing

from transports._interface import (
    CONTROL_CHANNEL_ENV,
    ChannelClosedError,
    ChannelProtocolError,
    TransportError,
)
from transports._windows import WindowsTransport
from transports._windows_api import (
    ERROR_BROKEN_PIPE,
    ERROR_INVALID_HANDLE,
    ERROR_IO_PENDING,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    FILE_FLAG_OVERLAPPED,
    PIPE_REJECT_REMOTE_CLIENTS,
)
from transports._windows_channel import FrameReader, PipeControlChannel, frame_header
from transports._windows_stream import PipeStream

from .windows_fakes import FakeIo, FakeWindows


def frame(body: bytes) -> bytes:
    return frame_header(len(body)) + body


class ByteSource:
    """Hands out scripted chunks, at most ``max_bytes`` at a time, then end-of-stream."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.requests: list[int] = []

    async def __call__(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.requests.append(max_bytes)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > max_bytes:
            self.chunks.insert(0, chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk


async def test_frames_split_across_one_byte_chunks() -> None:
    data = frame(b"first") + frame(b"") + frame(b"x" * 300)
    reader = FrameReader(ByteSource(*(data[i : i + 1] for i in range(len(data)))))
    assert await reader.read_frame(1024) == frame(b"first")
    assert await reader.read_frame(1024) == frame(b"")
    assert await reader.read_frame(1024) == frame(b"x" * 300)
    with pytest.raises(ChannelClosedError, match=r"closed the channel$"):
        await reader.read_frame(1024)


async def test_several_frames_in_one_chunk_are_returned_one_by_one() -> None:
    reader = FrameReader(ByteSource(frame(b"a") + frame(b"bb") + frame(b"ccc")[:4]))
    assert await reader.read_frame(16) == frame(b"a")
    assert await reader.read_frame(16) == frame(b"bb")
    assert reader.buffered == 4
    with pytest.raises(ChannelClosedError, match="middle of a frame"):
        await reader.read_frame(16)


async def test_bad_framing_byte_is_a_protocol_error() -> None:
    reader = FrameReader(ByteSource(b"\x02\x01\x00\x00\x00x"))
    with pytest.raises(ChannelProtocolError, match="framing byte"):
        await reader.read_frame(16)


async def test_oversize_length_is_refused_before_reading_the_body() -> None:
    source = ByteSource(frame_header(1 << 24), b"never read")
    reader = FrameReader(source)
    with pytest.raises(ChannelProtocolError, match="exceeds"):
        await reader.read_frame(1 << 16)
    assert source.chunks == [b"never read"]


async def test_truncated_header_is_end_of_stream_mid_frame() -> None:
    with pytest.raises(ChannelClosedError, match="middle of a frame"):
        await FrameReader(ByteSource(b"\x01\x05")).read_frame(16)


async def test_cancelled_read_keeps_the_partial_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-client", server_pid=1)
    channel = PipeControlChannel(
        fake.api(), io, PipeStream(fake.api(), io, handle, server_end=False), peer_pid=1
    )
    whole = frame(b"hello")
    io.feed(handle, whole[:3])
    with trio.move_on_after(1):
        await channel.receive_message(64)
    io.feed(handle, whole[3:])
    message = await channel.receive_message(64)
    assert message.framed == whole
    assert message.passed is None
    io.feed(handle, ERROR_BROKEN_PIPE)
    with pytest.raises(ChannelClosedError):
        await channel.receive_message(64)


async def test_control_pair_pipe_and_environment() -> None:
    fake = FakeWindows()
    io = FakeIo()
    transport = WindowsTransport(fake.api(), io)
    channel, control = transport.open_control_pair()

    (create,) = fake.calls_to("CreateNamedPipeW")
    name = create.args[0]
    open_mode, pipe_mode, max_instances = (create.int_arg(i) for i in (1, 2, 3))
    assert isinstance(name, str)
    expected = re.escape(f"\\\\.\\pipe\\rpb-v1-{transport.user_hash()}-ctl-") + "[0-9a-f]{32}"
    assert re.fullmatch(expected, name)
    assert open_mode & FILE_FLAG_FIRST_PIPE_INSTANCE and open_mode & FILE_FLAG_OVERLAPPED
    assert pipe_mode & PIPE_REJECT_REMOTE_CLIENTS
    assert max_instances == 1
    assert create.extra["sddl"] == f"D:P(A;;GA;;;{fake.sid})"
    (open_client,) = fake.calls_to("CreateFileW")
    assert open_client.args[0] == name
    assert fake.calls_to("ConnectNamedPipe")  # confirmed: ERROR_PIPE_CONNECTED
    assert io.waits == []
    assert io.registered == [channel.stream.handle]  # never the child's end
    assert control.env == {CONTROL_CHANNEL_ENV: f"handle:{control.handle}"}
    assert channel.peer_pid == 0  # until spawn_child says otherwise
    control.close()
    control.close()
    await channel.aclose()
    assert fake.open_handles() == []
    assert fake.local_allocs == {}


async def test_control_pair_that_does_not_connect_leaves_nothing_open() -> None:
    fake = FakeWindows()
    fake.fail("ConnectNamedPipe", ERROR_IO_PENDING)
    with pytest.raises(TransportError, match="did not connect"):
        WindowsTransport(fake.api(), FakeIo()).open_control_pair()
    assert fake.calls_to("CancelIoEx")
    assert fake.open_handles() == []


async def test_child_adopts_the_inherited_handle() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-client", server_pid=4444, inheritable=True)
    transport = WindowsTransport(fake.api(), io)
    channel = await transport.open_inherited_control_channel(
        {CONTROL_CHANNEL_ENV: f"handle:{handle}"}
    )
    assert channel.peer_pid == 4444  # the broker, from GetNamedPipeServerProcessId
    assert not fake.handles[handle].inheritable  # grandchildren do not get it
    assert io.registered == [handle]
    await channel.aclose()


async def test_child_adoption_removes_the_variable_from_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeWindows()
    handle = fake.new_handle("pipe-client", server_pid=4444)
    monkeypatch.setenv(CONTROL_CHANNEL_ENV, f"handle:{handle}")
    channel = await WindowsTransport(fake.api(), FakeIo()).open_inherited_control_channel()
    assert CONTROL_CHANNEL_ENV not in os.environ
    await channel.aclose()


@pytest.mark.parametrize(
    "value", [None, "", "fd:3", "handle:", "handle:-4", "handle:0x10", "handle:0"]
)
async def test_child_refuses_a_bad_variable(value: str | None) -> None:
    environ = {} if value is None else {CONTROL_CHANNEL_ENV: value}
    with pytest.raises(TransportError, match=CONTROL_CHANNEL_ENV):
        await WindowsTransport(FakeWindows().api(), FakeIo()).open_inherited_control_channel(
            environ
        )


async def test_child_refuses_a_handle_that_is_not_a_pipe() -> None:
    fake = FakeWindows()
    fake.fail("SetHandleInformation", ERROR_INVALID_HANDLE)
    with pytest.raises(TransportError, match="not an inherited pipe handle"):
        await WindowsTransport(fake.api(), FakeIo()).open_inherited_control_channel(
            {CONTROL_CHANNEL_ENV: "handle:1234"}
        )


async def test_concurrent_sends_are_serialized_whole_frames() -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-server", client_pid=1)
    channel = PipeControlChannel(
        fake.api(), io, PipeStream(fake.api(), io, handle, server_end=True), peer_pid=1
    )
    frames = [frame(bytes([i]) * (i + 1)) for i in range(20)]
    async with trio.open_nursery() as nursery:
        for f in frames:
            nursery.start_soon(channel.send_message, f)
    written = bytes(io.written[handle])
    reader = FrameReader(ByteSource(written))
    got = [await reader.read_frame(64) for _ in frames]
    assert sorted(got) == sorted(frames)  # no BusyResourceError, no torn frame
    with pytest.raises(ValueError, match="header"):
        await channel.send_message(frame(b"abc")[:-1])


async def test_interrupted_send_closes_the_channel_for_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeWindows()
    io = FakeIo()
    handle = fake.new_handle("pipe-server", client_pid=1)
    channel = PipeControlChannel(
        fake.api(), io, PipeStream(fake.api(), io, handle, server_end=True), peer_pid=1
    )
    io.write_gate = trio.Event()
    with trio.move_on_after(1):
        await channel.send_message(frame(b"x"))
    io.write_gate = None
    with pytest.raises(ChannelClosedError, match="interrupted"):
        await channel.send_message(frame(b"y"))
