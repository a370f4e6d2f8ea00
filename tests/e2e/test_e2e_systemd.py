"""``rpbroker serve`` under simulated systemd: socket activation and ``sd_notify``.

The test plays systemd's part with real pieces: it binds and listens on the
socket itself, binds a datagram socket for notifications, and starts the real
``rpbroker`` command with the listening socket at descriptor 3 and ``LISTEN_PID``
set to the serving process's own pid (a tiny wrapper dup2s the descriptor, sets the
variable and execs, so the pid is the broker's). Where systemd's own
``systemd-socket-activate`` is installed, one test uses it instead of the wrapper.
Embedded brokers are checked in-process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

import rpbroker
from rpbroker.config import ServiceManager

from .support import Workspace, read_exactly, round_trip

#: Bound on each test's waits, seconds: broker start and a backend spawn on a
#: loaded machine; a hang fails here.
HANG_GUARD_S = 60
#: The real console script installed next to this interpreter.
RPBROKER = str(Path(sys.executable).with_name("rpbroker"))
#: What systemd would do before exec: the socket at descriptor 3, LISTEN_PID = our pid.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""
#: Environment variables a backend must never inherit from a socket-activated broker.
SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


@contextmanager
def listening_socket(path: Path) -> Iterator[socket.socket]:
    """The socket a .socket unit would create: bound, listening, owned by the test."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
        yield sock
    finally:
        sock.close()


@asynccontextmanager
async def notify_socket(path: Path) -> AsyncIterator[trio.socket.SocketType]:
    """The service manager's notification socket."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(str(path))
        yield sock


async def next_notification(sock: trio.socket.SocketType) -> dict[str, str]:
    """The next sd_notify datagram as its KEY=value assignments."""
    with trio.fail_after(HANG_GUARD_S):
        data = await sock.recv(4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def serve_args(workspace: Workspace) -> list[str]:
    return [
        "serve",
        "--services",
        str(workspace.services),
        "--runtime-dir",
        str(workspace.runtime),
        "--log-level",
        "WARNING",
    ]


def activated_environment(notify_path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="rpbroker.socket")
    if notify_path is not None:
        env["NOTIFY_SOCKET"] = str(notify_path)
    return env


async def start_activated(
    nursery: trio.Nursery, workspace: Workspace, listener: socket.socket, notify_path: Path
) -> trio.Process:
    """Start ``rpbroker serve`` as systemd would, with ``listener`` at descriptor 3."""
    fd = listener.fileno()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", ACTIVATE, str(fd), RPBROKER, *serve_args(workspace)],
        pass_fds=(fd,),
        env=activated_environment(notify_path),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    nursery.start_soon(drain, process.stderr)
    return process


async def drain(stream: trio.abc.ReceiveStream) -> None:
    async with stream:
        while await stream.receive_some():
            pass


def children_of(pid: int) -> list[int]:
    """Child processes of ``pid``, without the broker's process-group reaper."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            with contextlib.suppress(OSError):
                if b"_unix_reaper_program" in (entry / "cmdline").read_bytes():
                    continue
            found.append(int(entry.name))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                inodes.add(os.stat(fd).st_ino)
        except OSError:
            continue
    return inodes


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


async def echo_both_routes(socket_path: str) -> None:
    for handoff in (True, False):
        async with rpbroker.connect(
            "echo", "1.0.0", broker=socket_path, handoff=handoff, hello_skip=False
        ) as stream:
            expected = rpbroker.Route.HANDOFF if handoff else rpbroker.Route.RECONNECT
            assert stream.route is expected
            assert await round_trip(stream, b"activated") == b"activated"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_socket_activated_broker_notifies_serves_and_leaves_the_socket(
    echo_workspace: Workspace,
) -> None:
    socket_path = echo_workspace.runtime / "activated.sock"
    notify_path = echo_workspace.root / "notify.sock"
    with listening_socket(socket_path) as listener:
        inode = os.stat(socket_path).st_ino
        async with notify_socket(notify_path) as notify:
            with trio.fail_after(HANG_GUARD_S):
                async with trio.open_nursery() as nursery:
                    process = await start_activated(nursery, echo_workspace, listener, notify_path)
                    ready = await next_notification(notify)
                    assert ready == {"READY": "1", "STATUS": f"serving on {socket_path}"}
                    await echo_both_routes(str(socket_path))

                    backends = children_of(process.pid)
                    assert len(backends) == 1
                    leaked = set(SYSTEMD_VARIABLES) & environment_of(backends[0]).keys()
                    assert leaked == set(), "backends never inherit systemd's variables"
                    listening_inode = os.fstat(listener.fileno()).st_ino
                    assert listening_inode in socket_inodes(process.pid)
                    assert listening_inode not in socket_inodes(backends[0])

                    process.send_signal(signal.SIGTERM)
                    stopping = await next_notification(notify)
                    assert stopping["STOPPING"] == "1"
                    assert stopping["STATUS"].startswith("shutting down")
                    assert await process.wait() == 0
                    nursery.cancel_scope.cancel()

            # The broker left the socket alone: same file, still listening (systemd's
            # copy, here ours), so a restarted broker serves it again.
            assert os.stat(socket_path).st_ino == inode
            with trio.fail_after(HANG_GUARD_S):
                async with trio.open_nursery() as nursery:
                    process = await start_activated(nursery, echo_workspace, listener, notify_path)
                    assert (await next_notification(notify))["READY"] == "1"
                    await echo_both_routes(str(socket_path))
                    process.send_signal(signal.SIGTERM)
                    assert (await next_notification(notify))["STOPPING"] == "1"
                    assert await process.wait() == 0
                    nursery.cancel_scope.cancel()
            assert os.stat(socket_path).st_ino == inode


async def run_activated_expecting_failure(
    workspace: Workspace, passed: int, *, listen_fds: str = "1", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    env = activated_environment(None)
    env["LISTEN_FDS"] = listen_fds
    with trio.fail_after(HANG_GUARD_S):
        return await trio.run_process(
            [sys.executable, "-c", ACTIVATE, str(passed), RPBROKER, *serve_args(workspace), *extra],
            pass_fds=(passed,),
            env=env,
            capture_stderr=True,
            check=False,
        )


async def test_a_passed_datagram_socket_is_refused_with_the_fix(workspace: Workspace) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wrong:
        wrong.bind(str(workspace.runtime / "dgram.sock"))
        result = await run_activated_expecting_failure(workspace, wrong.fileno())
    assert result.returncode == 3
    message = result.stderr.decode()
    assert "descriptor 3 passed by systemd" in message
    assert "SOCK_DGRAM" in message and "ListenStream=" in message
    assert "Traceback" not in message


async def test_more_than_one_passed_socket_is_refused(workspace: Workspace) -> None:
    with listening_socket(workspace.runtime / "a.sock") as listener:
        result = await run_activated_expecting_failure(workspace, listener.fileno(), listen_fds="2")
    assert result.returncode == 3
    assert "rpbroker serves exactly one" in result.stderr.decode()


async def test_a_socket_option_that_contradicts_the_passed_socket_is_refused(
    workspace: Workspace,
) -> None:
    passed = workspace.runtime / "a.sock"
    other = workspace.runtime / "other.sock"
    with listening_socket(passed) as listener:
        result = await run_activated_expecting_failure(
            workspace, listener.fileno(), extra=("--socket", str(other))
        )
        assert passed.exists(), "the refused socket's file is left alone"
    assert result.returncode == 3
    message = result.stderr.decode()
    assert f"--socket) is {other}, but systemd passed the socket {passed}" in message
    assert not other.exists()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
async def test_systemd_socket_activate_starts_the_broker_on_the_first_client(
    echo_workspace: Workspace,
) -> None:
    # systemd's own tool: it listens, and only when a client connects does it exec
    # rpbroker with the socket; that first client waits in the backlog meanwhile.
    socket_path = echo_workspace.runtime / "activated.sock"
    notify_path = echo_workspace.root / "notify.sock"
    async with notify_socket(notify_path) as notify:
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                process = await trio.lowlevel.open_process(
                    [
                        "systemd-socket-activate",
                        "--listen",
                        str(socket_path),
                        "-E",
                        f"NOTIFY_SOCKET={notify_path}",
                        "-E",
                        "PATH",
                        RPBROKER,
                        *serve_args(echo_workspace),
                    ],
                    stderr=subprocess.PIPE,
                )
                assert process.stderr is not None
                seen = b""
                while b"Listening on" not in seen:
                    chunk = await process.stderr.receive_some()
                    assert chunk, f"systemd-socket-activate exited: {seen.decode()}"
                    seen += chunk
                nursery.start_soon(drain, process.stderr)
                async with rpbroker.connect(
                    "echo", "1.0.0", broker=str(socket_path), initial_data=b"first"
                ) as stream:
                    assert await read_exactly(stream, 5) == b"first"
                assert (await next_notification(notify))["READY"] == "1"
                process.send_signal(signal.SIGTERM)
                assert (await next_notification(notify))["STOPPING"] == "1"
                assert await process.wait() == 0
                nursery.cancel_scope.cancel()
    assert socket_path.exists(), "the activated socket's file is not the broker's to remove"


async def test_an_embedded_broker_ignores_systemd_unless_asked(
    echo_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = echo_workspace.root / "notify.sock"
    for name, value in [("LISTEN_PID", str(os.getpid())), ("LISTEN_FDS", "1")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        async with rpbroker.open_broker(echo_workspace.config()) as broker:
            assert broker.socket_path == echo_workspace.socket
            await echo_both_routes(broker.socket_path)
        with pytest.raises(BlockingIOError):
            notify.recv(1, socket.MSG_DONTWAIT)  # nothing was sent
    assert os.environ["LISTEN_FDS"] == "1" and os.environ["NOTIFY_SOCKET"] == str(notify_path)


async def test_an_embedded_broker_under_systemd_without_a_socket_binds_and_notifies(
    echo_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = echo_workspace.root / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    async with notify_socket(notify_path) as notify:
        config = echo_workspace.config(service_manager=ServiceManager.SYSTEMD)
        async with rpbroker.open_broker(config) as broker:
            assert "NOTIFY_SOCKET" not in os.environ, "read once, not passed to backends"
            ready = await next_notification(notify)
            assert ready == {"READY": "1", "STATUS": f"serving on {echo_workspace.socket}"}
            await echo_both_routes(broker.socket_path)
        assert (await next_notification(notify))["STOPPING"] == "1"
    assert not Path(echo_workspace.socket).exists(), "a socket it bound itself is removed"


EXAMPLE_UNITS = Path(__file__).resolve().parents[2] / "examples" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_example_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart= is executable: point it at this rpbroker.
    for unit in ("rpbroker.socket", "rpbroker.service"):
        text = (EXAMPLE_UNITS / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/rpbroker", RPBROKER))
    service = (tmp_path / "rpbroker.service").read_text()
    assert (
        "Type=notify" in service and "ListenStream=" in (tmp_path / "rpbroker.socket").read_text()
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "./rpbroker.socket", "./rpbroker.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
