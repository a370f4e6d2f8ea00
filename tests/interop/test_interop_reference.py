"""Interop with the reference's real code (the ``running-process`` 4.10.17 wheel).

(a) The reference's own probe client, inside its ``ServiceClient`` supervisor,
probes an rpbroker SDK backend and accepts it only if the probe reply's identity
passes every check it makes (nonce and request_id echo; pid, exe_path, exe_hash,
boot_id and endpoint equal to the identity file; the executable of that pid and
its BLAKE3 hash; the boot). (b) rpbroker's probe client verifies a reference
``ServiceServer``. Every process is real; the reference reads
``$XDG_RUNTIME_DIR``, so each test gets a private one.

The reference client exposes only polled state (``state``, ``try_recv``: it is
built for event loops that can only poll), so waiting on it is a bounded poll.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from running_process_service import ServiceClient, ServiceSpec

import transports
from rpbroker import control, wire
from rpbroker.identity import file_blake3
from rpbroker.launcher import LaunchRequest, ProcessLauncher
from rpbroker.probe_client import probe_endpoint
from rpbroker.services import ServiceSpec as RpbServiceSpec
from rpbroker.wire import parse_probe_reply, probe_request_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body

HERE = Path(__file__).resolve().parent
FRAME_BACKEND = HERE / "frame_backend.py"
REFERENCE_SERVICE = HERE / "reference_service.py"
NAME = "rpb-interop"
#: Between two looks at the reference client's polled state, seconds.
POLL_S = 0.02


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``$XDG_RUNTIME_DIR`` (short: socket paths must fit ``sun_path``)."""
    root = Path(tempfile.mkdtemp(prefix="rpi-", dir="/tmp"))
    root.chmod(0o700)
    (root / "running-process" / "broker-v2").mkdir(mode=0o700, parents=True)
    (root / "running-process").chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    try:
        yield root
    finally:
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        root.rmdir()


def spec_in(runtime: Path) -> ServiceSpec:
    return ServiceSpec(
        name=NAME, version="1.0.0", payload_protocol=0xF0B7, runtime_dir=runtime / "state"
    )


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def identity_json(pid: int, exe_path: str, endpoint: str) -> dict[str, Any]:
    """An identity file as the reference writes one, from facts this test reads itself."""
    return {
        "pid": pid,
        "exe_path": exe_path,
        "exe_hash_algorithm": "blake3",
        "exe_hash": list(file_blake3(os.readlink(f"/proc/{pid}/exe"))),
        "legacy_exe_sha256": [0] * 32,
        "boot_id": boot_id(),
        "ipc_endpoint": {"namespace_id": NAME, "path": endpoint},
        "started_at_unix_ms": 1,
        "idle_timeout_secs": None,
    }


@asynccontextmanager
async def sdk_backend(endpoint: str) -> AsyncIterator[int]:
    """A real rpbroker SDK backend process listening on ``endpoint``; yields its pid."""
    spec = RpbServiceSpec(
        service_name=NAME,
        command=(sys.executable, str(FRAME_BACKEND)),
        source=FRAME_BACKEND,
    )
    launched = await ProcessLauncher().launch(
        LaunchRequest(NAME, "1.0.0", instance=NAME, endpoint=endpoint, spec=spec)
    )
    channel = launched.channel
    assert channel is not None  # an SDK backend has its control channel
    try:
        message = await channel.receive_message(MAX_FRAME_BYTES)
        ready = control.parse(message.framed)
        assert isinstance(ready, control.ReadyNotice)
        yield launched.process.pid
    finally:
        launched.process.kill_tree()
        with trio.CancelScope(shield=True):
            await launched.process.wait()
            await channel.aclose()


async def wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(POLL_S)


async def test_reference_probe_client_accepts_an_rpbroker_backend(runtime: Path) -> None:
    spec = spec_in(runtime)
    with trio.fail_after(30):
        async with sdk_backend(spec.endpoint) as pid:
            spec.identity_path.parent.mkdir(mode=0o700)
            real_exe = os.readlink(f"/proc/{pid}/exe")
            spec.identity_path.write_text(json.dumps(identity_json(pid, real_exe, spec.endpoint)))
            client = ServiceClient.connect(spec)
            try:
                await wait_for(lambda: client.state == "up")  # every probe check passed
                request_id = client.send(b"ping")
                while (reply := client.try_recv()) is None:
                    await trio.sleep(POLL_S)
                assert reply.request_id == request_id
                assert reply.payload == b"pong:ping"
            finally:
                client.close()


async def test_reference_probe_client_rejects_the_old_symlink_exe_path(runtime: Path) -> None:
    # What the SDK used to claim: the venv's ``python`` symlink, not the real executable.
    spec = spec_in(runtime)
    with trio.fail_after(30):
        async with sdk_backend(spec.endpoint) as pid:
            spec.identity_path.parent.mkdir(mode=0o700)
            claimed = identity_json(pid, sys.executable, spec.endpoint)
            assert sys.executable != os.readlink(f"/proc/{pid}/exe")
            spec.identity_path.write_text(json.dumps(claimed))
            client = ServiceClient.connect(spec)
            try:
                await wait_for(lambda: client.state == "down")  # the first probe failed
            finally:
                client.close()


@asynccontextmanager
async def reference_server(runtime: Path) -> AsyncIterator[tuple[trio.Process, int, str]]:
    """``reference_service.py`` as a child; yields (process, pid, endpoint) once bound."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(REFERENCE_SERVICE), NAME, str(runtime / "state")],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, "the reference service exited before binding"
            line += chunk
        word, pid, endpoint = line.decode().split()
        assert word == "ready"
        yield process, int(pid), endpoint
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_rpbroker_probe_client_verifies_a_reference_service_server(runtime: Path) -> None:
    spec = spec_in(runtime)
    with trio.fail_after(30):
        async with reference_server(runtime) as (process, pid, endpoint):
            assert endpoint == spec.endpoint
            identity = await probe_endpoint(endpoint)
            assert identity.pid == pid == process.pid
            assert identity.exe_path == os.readlink(f"/proc/{pid}/exe")
            assert (identity.ipc_endpoint.namespace_id, identity.ipc_endpoint.path) == (
                NAME,
                endpoint,
            )
            assert not identity.HasField("idle_timeout_secs")
            recorded = json.loads(spec.identity_path.read_text())
            assert list(identity.exe_hash) == recorded["exe_hash"]
            assert identity.boot_id == recorded["boot_id"] == boot_id()
            assert await probe_endpoint(endpoint, recorded=identity) == identity
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    assert not spec.identity_path.exists()
    assert not Path(endpoint).exists()


async def test_reference_service_server_answers_every_request_id_form(runtime: Path) -> None:
    nonce = bytes(range(32, 64))
    with trio.fail_after(30):
        async with reference_server(runtime) as (_process, pid, endpoint):
            for request_id in (0, 1, 2**64 - 1, None):
                stream = await transports.connect(endpoint)
                async with stream:
                    await stream.send_all(probe_request_frame(nonce, request_id=request_id))
                    body = await read_frame_body(stream, MAX_FRAME_BYTES)
                expected = wire.probe_request_id(nonce) if request_id is None else request_id
                assert wire.decode_frame(body).request_id == expected
                assert parse_probe_reply(body, nonce, request_id=expected).pid == pid
