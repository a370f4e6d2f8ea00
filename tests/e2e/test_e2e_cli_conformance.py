"""``rpbroker serve`` as a real process, driven by a client written from the wire schema alone.

The client here does not import rpbroker: it encodes Hello by hand from the v1 field
numbers, decodes the reply by hand, and for the handoff route receives the
handoff-ready EVENT on its own connection. It runs in a worker thread with plain
blocking sockets, so it shares nothing with rpbroker's code.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import trio

from .support import Workspace, child_pids

REPO = Path(__file__).resolve().parents[2]


# -- a minimal proto3 codec, from the schema tables ---------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""


def field_bytes(number: int, value: bytes) -> bytes:
    return varint((number << 3) | 2) + varint(len(value)) + value if value else b""


def parse(data: bytes) -> dict[int, list[int | bytes]]:
    fields: dict[int, list[int | bytes]] = {}
    i = 0

    def read_varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = data[i]
            i += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while i < len(data):
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields.setdefault(number, []).append(read_varint())
        elif wire_type == 2:
            length = read_varint()
            fields.setdefault(number, []).append(data[i : i + length])
            i += length
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
    return fields


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> dict[int, list[int | bytes]]:
    header = recv_exactly(sock, 5)
    assert header[0] == 1
    (length,) = struct.unpack("<I", header[1:])
    return parse(recv_exactly(sock, length))


def hello_frame(service: str, version: str, caps: int) -> bytes:
    hello = (
        field_varint(1, 1)
        + field_varint(2, 1)
        + field_bytes(3, service.encode())
        + field_bytes(4, version.encode())
        + field_varint(6, caps)
        + field_bytes(8, b"hello")
        + field_varint(10, os.getpid())
        + field_bytes(11, b"schema-only")
    )
    frame = field_varint(1, 1) + field_varint(3, 0) + field_bytes(4, hello) + field_varint(5, 9)
    return b"\x01" + struct.pack("<I", len(frame)) + frame


def schema_only_client(socket_path: str, *, handoff: bool) -> tuple[str, bytes]:
    """Negotiate, take whichever route the broker offers, echo one message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(socket_path)
    payload = b"schema-only-request"
    sock.sendall(hello_frame("echo", "1.0.0", 1 if handoff else 0) + (payload if handoff else b""))
    frame = recv_frame(sock)
    assert frame[2] == [1], "RESPONSE"
    assert frame[5] == [9], "request_id echoed"
    reply = parse(frame[4][0])  # type: ignore[arg-type]
    assert 1 in reply, f"negotiated expected, got {reply}"
    negotiated = parse(reply[1][0])  # type: ignore[arg-type]
    backend_pipe = negotiated[3][0]
    token = negotiated.get(7, [b""])[0]
    assert isinstance(backend_pipe, bytes) and isinstance(token, bytes)
    caps = negotiated.get(5, [0])[0]
    if handoff and caps == 1 and len(token) == 16:
        event = recv_frame(sock)
        assert event[2] == [2], "EVENT"
        assert event[3] == [0xD0FF]
        ack = parse(event[4][0])  # type: ignore[arg-type]
        assert ack[1] == [token] and ack[2] == [1], "accepted, with our token"
        route = "handoff"
    else:
        sock.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(backend_pipe.decode())
        sock.sendall(payload)
        route = "reconnect"
    echoed = recv_exactly(sock, len(payload))
    sock.close()
    return route, echoed


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = await trio.run_process(
        [sys.executable, "-m", "rpbroker", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def start_cli_broker(nursery: trio.Nursery, workspace: Workspace) -> trio.Process:
    """Start ``rpbroker serve``; return once it says it serves (it binds first)."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "rpbroker",
            "serve",
            "--socket",
            workspace.socket,
            "--services",
            str(workspace.services),
            "--runtime-dir",
            str(workspace.runtime),
            "--log-level",
            "WARNING",
        ],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr
    seen = b""
    while b"serving on" not in seen:
        chunk = await stderr.receive_some()
        assert chunk, f"broker exited before serving: {seen.decode()}"
        seen += chunk

    async def drain() -> None:
        async with stderr:
            while await stderr.receive_some():
                pass

    nursery.start_soon(drain)
    return process


async def test_schema_only_client_negotiates_both_routes_with_rpbroker_serve(
    echo_workspace: Workspace,
) -> None:
    socket_path = echo_workspace.socket
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process = await start_cli_broker(nursery, echo_workspace)
            route, echoed = await trio.to_thread.run_sync(
                lambda: schema_only_client(socket_path, handoff=True)
            )
            assert (route, echoed) == ("handoff", b"schema-only-request")
            route, echoed = await trio.to_thread.run_sync(
                lambda: schema_only_client(socket_path, handoff=False)
            )
            assert (route, echoed) == ("reconnect", b"schema-only-request")

            status = await run_cli("status", "--socket", socket_path, "--json")
            assert status.returncode == 0
            assert '"schema_version": 1' in status.stdout
            assert '"service_name": "echo"' in status.stdout
            assert (await run_cli("readyz", "--socket", socket_path)).stdout == "ready\n"
            metrics = await run_cli("metrics", "--socket", socket_path)
            assert metrics.stdout.rstrip().endswith("# EOF")
            broadcast = await run_cli(
                "broadcast", "release-handles", "/tmp", "--socket", socket_path, "--json"
            )
            assert broadcast.returncode == 0, broadcast.stderr
            assert '"all_live_backends_acked": true' in broadcast.stdout

            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            nursery.cancel_scope.cancel()
    assert not Path(socket_path).exists()
    assert child_pids() == set()


async def test_cli_reports_a_missing_broker_with_exit_3(workspace: Workspace) -> None:
    result = await run_cli("status", "--socket", str(workspace.runtime / "nobody.sock"))
    assert result.returncode == 3
    assert "no broker at" in result.stderr


async def test_cli_shutdown_verb_stops_the_broker(echo_workspace: Workspace) -> None:
    socket_path = echo_workspace.socket
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process = await start_cli_broker(nursery, echo_workspace)
            result = await run_cli(
                "shutdown", "--socket", socket_path, "--drain-deadline-ms", "500"
            )
            assert result.stdout == "broker shutting down\n"
            assert await process.wait() == 0
            nursery.cancel_scope.cancel()
    assert not Path(socket_path).exists()
