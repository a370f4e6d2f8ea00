"""Unix transport with real processes: fd passing, peer identity, spawning, process trees.

The process-group reaper is tested here too: its lifetime and descriptors, and a
"broker" (a child that uses ``spawn_child``) whose SIGKILL must take every group
it spawned, grandchildren included, even after its reaper was killed and replaced.

Every child is a real Python process started with ``spawn_child`` and a control
socketpair; child programs are passed with ``-c`` and import this repository's
``transports`` through ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import transports
from transports import (
    ChannelClosedError,
    ConnectionPassError,
    EndpointInUseError,
    PassFailure,
    SpawnError,
)
from transports._unix import UnixChildProcess, UnixControlChannel
from transports._unix_reaper import GroupReaper, current_group_reaper

HANG_GUARD_S = 10
MAX_BODY = 1 << 20
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="Linux-only kernel feature")

PRELUDE = r"""
import json, os, signal, subprocess, sys
import trio
import transports

def frame(body):
    return b"\x01" + len(body).to_bytes(4, "little") + body
"""

#: Receives passed connections, reports their token/offer/peer, and echoes on each.
ECHO_BACKEND = (
    PRELUDE
    + r"""
async def serve(stream):
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(b"echo:" + data)

async def main():
    ch = await transports.open_inherited_control_channel()
    hello = {"peer_pid": ch.peer_pid, "ppid": os.getppid(),
             "env_left": transports.CONTROL_CHANNEL_ENV in os.environ}
    await ch.send_message(frame(json.dumps(hello).encode()))
    async with trio.open_nursery() as nursery:
        while True:
            try:
                msg = await ch.receive_message(1 << 20)
            except transports.ChannelClosedError:
                nursery.cancel_scope.cancel()
                return
            report = {"offer": msg.framed[5:].decode(), "passed": msg.passed is not None}
            if msg.passed is not None:
                report["token"] = msg.passed.token.hex()
                report["client_pid"] = transports.peer_identity(msg.passed.stream).pid
                nursery.start_soon(serve, msg.passed.stream)
            await ch.send_message(frame(json.dumps(report).encode()))

trio.run(main)
"""
)

#: Connects to argv[1], sends argv[2], reports what came back.
CLIENT = (
    PRELUDE
    + r"""
async def main():
    ch = await transports.open_inherited_control_channel()
    stream = await transports.connect(sys.argv[1])
    await stream.send_all(sys.argv[2].encode())
    await stream.send_eof()
    got = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        got += data
    await ch.send_message(frame(got))
    await stream.aclose()

trio.run(main)
"""
)

#: Binds argv[1] with open_listener, says so, then waits to be killed.
BINDER = (
    PRELUDE
    + r"""
async def main():
    ch = await transports.open_inherited_control_channel()
    listener = await transports.open_listener(sys.argv[1])
    await ch.send_message(frame(b"bound"))
    await trio.sleep_forever()

trio.run(main)
"""
)

#: Reports its environment, cwd, groups and descriptors.
INFO = (
    PRELUDE
    + r"""
async def main():
    ch = await transports.open_inherited_control_channel()
    try:
        os.fstat(int(sys.argv[1]))
        leaked = True
    except OSError:
        leaked = False
    info = {
        "cwd": os.getcwd(), "probe": os.environ.get("RPB_PROBE"),
        "control_env_left": transports.CONTROL_CHANNEL_ENV in os.environ,
        "pgid": os.getpgid(0), "sid": os.getsid(0), "pid": os.getpid(),
        "leaked": leaked, "stdin_is_devnull": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
    }
    await ch.send_message(frame(json.dumps(info).encode()))
    try:
        await ch.receive_message(10)
    except transports.ChannelClosedError:
        pass

trio.run(main)
"""
)

#: Starts a grandchild in its own process group (argv[1] == "same-group" keeps it in
#: ours), reports its pid, then waits, or exits when argv[2] == "exit".
WITH_GRANDCHILD = (
    PRELUDE
    + r"""
async def main():
    ch = await transports.open_inherited_control_channel()
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    await ch.send_message(frame(str(grandchild.pid).encode()))
    if sys.argv[1] == "exit":
        os._exit(0)
    await trio.sleep_forever()

trio.run(main)
"""
)

#: Spawns a grandchild with transports.spawn_child (so it has a parent-death signal),
#: reports its pid, and waits to be killed.
INTERMEDIATE = (
    PRELUDE
    + r"""
async def main():
    ch = await transports.open_inherited_control_channel()
    _channel, control = transports.open_control_pair()
    grandchild = await transports.spawn_child(
        [sys.executable, "-c", "import signal; signal.pause()"], dict(os.environ), control
    )
    await ch.send_message(frame(str(grandchild.pid).encode()))
    await trio.sleep_forever()

trio.run(main)
"""
)

#: Closes its stdio, then spawns a grandchild over a fresh control pair whose
#: descriptors would otherwise be 0 and 1; exits 0 if the grandchild's frame arrives.
STDIO_CLOSED = (
    PRELUDE
    + r"""
GRANDCHILD = (
    "import trio, transports\n"
    "async def main():\n"
    "    ch = await transports.open_inherited_control_channel()\n"
    "    await ch.send_message(b'\\x01\\x02\\x00\\x00\\x00ok')\n"
    "trio.run(main)\n"
)

async def main():
    for fd in (0, 1, 2):
        os.close(fd)
    channel, control = transports.open_control_pair()
    if control.fileno() < 3:
        os._exit(3)
    argv = [sys.executable, "-c", GRANDCHILD]
    child = await transports.spawn_child(argv, dict(os.environ), control)
    message = await channel.receive_message(100)
    if message.framed != frame(b"ok"):
        os._exit(4)
    os._exit(await child.wait())

trio.run(main)
"""
)

SLEEPER = "import signal; signal.pause()"


def frame(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(4, "little") + body


async def body_of(channel: UnixControlChannel) -> bytes:
    message = await channel.receive_message(MAX_BODY)
    assert message.passed is None
    return message.framed[5:]


@asynccontextmanager
async def running(
    script: str, env: dict[str, str], *args: str, cwd: str | None = None
) -> AsyncIterator[tuple[UnixControlChannel, UnixChildProcess]]:
    """A child Python process with a control channel; killed and reaped on exit."""
    channel, control = transports.open_control_pair()
    child = await transports.spawn_child(
        [sys.executable, "-c", script, *args], env, control, cwd=cwd
    )
    try:
        yield channel, child
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(HANG_GUARD_S):
            child.kill_tree()
            await child.wait()
            await channel.aclose()


async def wait_for_exit_of(pid: int) -> None:
    """Wait until a process that is not our child exits (pidfd; Linux)."""
    pidfd = open_pidfd(pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def open_pidfd(pid: int) -> int:
    """A pidfd for ``pid``: readable once it exits, even if it is not our child."""
    if sys.platform != "linux":
        pytest.skip("pidfd is Linux-only")
    return os.pidfd_open(pid)


def reap_leftover(pidfd: int) -> None:
    """Kill a grandchild a failed test may have left behind, then close its pidfd."""
    if sys.platform != "linux":
        pytest.skip("pidfd is Linux-only")
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone, as a passing test expects
    finally:
        os.close(pidfd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_fd_passing_between_processes(sockdir: Path, child_env: dict[str, str]) -> None:
    token = secrets.token_bytes(16)
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    with trio.fail_after(HANG_GUARD_S):
        async with running(ECHO_BACKEND, child_env) as (channel, child):
            hello = json.loads(await body_of(channel))
            assert hello == {"peer_pid": os.getpid(), "ppid": os.getpid(), "env_left": False}
            assert channel.peer_pid == child.pid
            client = await transports.connect(listener.path)
            server = await listener.accept()
            receipt = await channel.pass_connection_then_send(server, token, frame(b"offer-1"))
            assert receipt.handle_value == 0 and receipt.duplicated_handle is None
            await server.aclose()  # the sender's copy is closed right after passing
            report = json.loads(await body_of(channel))
            assert report == {
                "offer": "offer-1",
                "passed": True,
                "token": token.hex(),
                "client_pid": os.getpid(),
            }
            await client.send_all(b"hello")
            assert await client.receive_some(100) == b"echo:hello"
            await client.send_eof()
            assert await client.receive_some(100) == b""  # the child closed its copy
            await client.aclose()
            await channel.aclose()  # the child sees EOF and exits on its own
            assert await child.wait() == 0
    await listener.aclose()


async def test_a_third_process_talks_through_the_passed_fd(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    with trio.fail_after(HANG_GUARD_S):
        async with running(ECHO_BACKEND, child_env) as (backend, _child):
            await body_of(backend)
            async with running(CLIENT, child_env, listener.path, "from the third") as (
                client_channel,
                client,
            ):
                server = await listener.accept()
                assert transports.peer_identity(server).pid == client.pid
                token = secrets.token_bytes(16)
                await backend.pass_connection_then_send(server, token, frame(b"offer"))
                await server.aclose()
                report = json.loads(await body_of(backend))
                assert report["token"] == token.hex()
                assert report["client_pid"] == client.pid
                assert await body_of(client_channel) == b"echo:from the third"
                assert await client.wait() == 0
    await listener.aclose()


async def test_several_connections_and_plain_frames_interleaved(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    clients: list[trio.SocketStream] = []
    with trio.fail_after(HANG_GUARD_S):
        async with running(ECHO_BACKEND, child_env) as (channel, _child):
            await body_of(channel)
            for index in range(3):
                clients.append(await transports.connect(listener.path))
                server = await listener.accept()
                token = bytes([index]) * 16
                await channel.pass_connection_then_send(server, token, frame(b"offer-%d" % index))
                await server.aclose()
                await channel.send_message(frame(b"plain-%d" % index))
                passed = json.loads(await body_of(channel))
                assert passed["token"] == token.hex() and passed["offer"] == f"offer-{index}"
                plain = json.loads(await body_of(channel))
                assert plain == {"offer": f"plain-{index}", "passed": False}
            for index, client in enumerate(clients):
                await client.send_all(b"n%d" % index)
                assert await client.receive_some(100) == b"echo:n%d" % index
                await client.aclose()
    await listener.aclose()


async def test_pass_to_an_exited_child_is_backend_unavailable(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    channel, control = transports.open_control_pair()
    child = await transports.spawn_child([sys.executable, "-c", "pass"], child_env, control)
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    with trio.fail_after(HANG_GUARD_S):
        assert await child.wait() == 0
        client = await transports.connect(listener.path)
        server = await listener.accept()
        with pytest.raises(ConnectionPassError) as info:
            await channel.pass_connection_then_send(server, bytes(16), frame(b"offer"))
        assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
        assert not info.value.fd_may_have_reached_backend
        with pytest.raises(ChannelClosedError):
            await channel.receive_message(MAX_BODY)
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()
    await channel.aclose()


async def test_peer_identity_of_a_child_process(sockdir: Path, child_env: dict[str, str]) -> None:
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    with trio.fail_after(HANG_GUARD_S):
        async with running(CLIENT, child_env, listener.path, "x") as (channel, child):
            server = await listener.accept()
            identity = transports.peer_identity(server)
            assert identity.pid == child.pid
            assert identity.user == transports.current_user()
            assert await server.receive_some(10) == b"x"
            await server.send_all(b"y")
            await server.aclose()
            assert await body_of(channel) == b"y"
    await listener.aclose()


def _connect_as_nobody(address: str | bytes) -> int:
    """Fork a child that drops to uid/gid 65534 and connects; return its pid.

    Exit status: 0 connected, 13 permission denied, 1 anything else.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    return pid


def _exit_code_of_exited(pid: int) -> int:
    """Reap a forked child that has already exited (does not block)."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    assert reaped == pid
    return os.waitstatus_to_exitcode(status)


async def _reap_forked(pid: int) -> int:
    await wait_for_exit_of(pid)
    return _exit_code_of_exited(pid)


@LINUX_ONLY
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as nobody")
async def test_peer_of_another_user(sockdir: Path) -> None:
    # Through the private directory the other user cannot even reach the socket.
    listener = await transports.open_listener(str(sockdir / "front.sock"))
    with trio.fail_after(HANG_GUARD_S):
        assert await _reap_forked(_connect_as_nobody(listener.path)) == 13
    await listener.aclose()
    # On an abstract socket (no file permissions) it connects; the kernel names its uid.
    name = b"\0rpbroker-test-" + secrets.token_hex(8).encode()
    raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await raw.bind(name)
    raw.listen(1)
    with trio.fail_after(HANG_GUARD_S):
        pid = _connect_as_nobody(name)
        conn, _ = await raw.accept()
        stream = trio.SocketStream(conn)
        identity = transports.peer_identity(stream)
        assert await _reap_forked(pid) == 0
    assert identity.user == "65534" != transports.current_user()
    assert identity.pid == pid
    await stream.aclose()
    raw.close()


async def test_stale_socket_of_a_killed_process_is_cleaned_up(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    path = str(sockdir / "shared.sock")
    with trio.fail_after(HANG_GUARD_S):
        async with running(BINDER, child_env, path) as (channel, child):
            assert await body_of(channel) == b"bound"
            with pytest.raises(EndpointInUseError, match="in use"):
                await transports.open_listener(path)
            child.kill_tree()
            assert await child.wait() == -signal.SIGKILL
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind by the killed process
        listener = await transports.open_listener(path)
        client = await transports.connect(path)
        server = await listener.accept()
        await client.aclose()
        await server.aclose()
        await listener.aclose()


async def test_spawn_environment_cwd_stdin_group_and_descriptors(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    # An inheritable descriptor at a high number must still not reach the child.
    r, w = os.pipe()
    os.dup2(r, 200)
    os.set_inheritable(200, True)
    env = {**child_env, "RPB_PROBE": "42"}
    try:
        with trio.fail_after(HANG_GUARD_S):
            async with running(INFO, env, "200", cwd=str(sockdir)) as (channel, child):
                info = json.loads(await body_of(channel))
    finally:
        for fd in (r, w, 200):
            os.close(fd)
    assert info == {
        "cwd": str(sockdir),
        "probe": "42",
        "control_env_left": False,
        "pgid": child.pid,
        "sid": child.pid,
        "pid": child.pid,
        "leaked": False,
        "stdin_is_devnull": True,
    }


async def test_spawn_errors_name_the_program_and_close_the_control(
    sockdir: Path, child_env: dict[str, str]
) -> None:
    not_executable = sockdir / "script"
    not_executable.write_text("#!/bin/sh\n")
    for program, problem in [
        ("/nonexistent/rpb-backend", "No such file"),
        (str(not_executable), "Permission denied"),
    ]:
        channel, control = transports.open_control_pair()
        with pytest.raises(SpawnError, match=problem) as info:
            await transports.spawn_child([program], child_env, control)
        assert program in str(info.value)
        with pytest.raises(ValueError):
            control.fileno()  # closed by spawn_child
        await channel.aclose()
    channel, control = transports.open_control_pair()
    with pytest.raises(SpawnError, match="empty"):
        await transports.spawn_child([], child_env, control)
    with pytest.raises(ValueError):
        control.fileno()
    await channel.aclose()
    assert current_group_reaper().pid is None, "no reaper is left for a failed spawn"


async def test_spawn_refuses_a_foreign_child_control(child_env: dict[str, str]) -> None:
    class Foreign:
        @property
        def env(self) -> dict[str, str]:
            return {}

        def close(self) -> None:
            pass

    with pytest.raises(TypeError, match="open_control_pair"):
        await transports.spawn_child([sys.executable], child_env, Foreign())


@LINUX_ONLY
async def test_kill_tree_kills_a_grandchild(child_env: dict[str, str]) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(WITH_GRANDCHILD, child_env, "stay") as (channel, child):
            grandchild = int(await body_of(channel))
            assert os.getpgid(grandchild) == child.pid
            pidfd = open_pidfd(grandchild)
            try:
                child.kill_tree()
                assert await child.wait() == -signal.SIGKILL
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                reap_leftover(pidfd)
            child.kill_tree()  # idempotent after exit
            child.terminate_tree()


@LINUX_ONLY
@pytest.mark.parametrize("observe", ["wait", "returncode"])
async def test_the_group_dies_with_its_leader_before_the_leader_is_reaped(
    child_env: dict[str, str], observe: str
) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(WITH_GRANDCHILD, child_env, "exit") as (channel, child):
            grandchild = int(await body_of(channel))
            assert os.getpgid(grandchild) == child.pid
            pidfd = open_pidfd(grandchild)
            try:
                if observe == "wait":
                    assert await child.wait() == 0  # the leader's own status is kept
                else:
                    await wait_for_exit_of(child.pid)  # exited, not reaped
                    assert child.returncode == 0
                # Killed while the leader's zombie still held the group id.
                await trio.lowlevel.wait_readable(pidfd)
                # Reaped: nothing is signalled any more, the id may belong to anyone.
                child.kill_tree()
                child.terminate_tree()
            finally:
                reap_leftover(pidfd)


async def test_terminate_tree_and_returncode(child_env: dict[str, str]) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(SLEEPER, child_env) as (_channel, child):
            assert child.returncode is None
            assert alive(child.pid)
            child.terminate_tree()
            assert await child.wait() == -signal.SIGTERM
            assert child.returncode == -signal.SIGTERM
            assert await child.wait() == -signal.SIGTERM  # again: cached
            child.terminate_tree()
            child.kill_tree()
    assert "UnixChildProcess" in repr(child)


async def test_cancelled_wait_leaves_the_child_alone_and_waiters_share(
    child_env: dict[str, str],
) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(SLEEPER, child_env) as (_channel, child):
            with trio.CancelScope() as scope:
                scope.cancel()
                await child.wait()
            with trio.move_on_after(0.01):
                await child.wait()
            assert child.returncode is None
            assert alive(child.pid)
            results: list[int] = []

            async def waiter() -> None:
                results.append(await child.wait())

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert results == []
                child.kill_tree()
            assert results == [-signal.SIGKILL] * 3


@LINUX_ONLY
async def test_a_child_dies_with_its_parent(child_env: dict[str, str]) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(INTERMEDIATE, child_env) as (channel, intermediate):
            grandchild = int(await body_of(channel))
            # Its own session: killing the intermediate's group would not reach it.
            assert os.getsid(grandchild) == grandchild
            pidfd = open_pidfd(grandchild)
            try:
                assert alive(grandchild)
                os.kill(intermediate.pid, signal.SIGKILL)
                assert await intermediate.wait() == -signal.SIGKILL
                await trio.lowlevel.wait_readable(pidfd)  # PR_SET_PDEATHSIG fired
            finally:
                reap_leftover(pidfd)


async def test_control_pair_avoids_standard_stream_numbers(child_env: dict[str, str]) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(STDIO_CLOSED, child_env) as (_channel, child):
            assert await child.wait() == 0


# -- the process-group reaper ------------------------------------------------------------

#: A broker in miniature: spawns two children that each start a grandchild in
#: their group, SIGKILLs its own reaper between the two spawns, reports every pid.
MINI_BROKER = (
    PRELUDE
    + r"""
from transports._unix_reaper import current_group_reaper

async def main():
    up = await transports.open_inherited_control_channel()
    reaper = current_group_reaper()
    report = {"children": [], "grandchildren": [], "reapers": []}
    kept = []
    for round in range(2):
        channel, control = transports.open_control_pair()
        argv = [sys.executable, "-c", sys.argv[1], "stay"]
        child = await transports.spawn_child(argv, dict(os.environ), control)
        message = await channel.receive_message(100)
        report["children"].append(child.pid)
        report["grandchildren"].append(int(message.framed[5:]))
        report["reapers"].append(reaper.pid)
        kept.append((channel, child))
        if round == 0:
            os.kill(reaper.pid, signal.SIGKILL)  # the next spawn must replace it
            # Wait (without reaping) until it is dead: a reaper that is still dying
            # takes the next record into its pipe and is replaced only at the change after.
            os.waitid(os.P_PID, reaper.pid, os.WEXITED | os.WNOWAIT)
    report["watched"] = sorted(reaper.watched)
    await up.send_message(frame(json.dumps(report).encode()))
    await trio.sleep_forever()

trio.run(main)
"""
)


def pipe_of(pid: int | str, fd: str) -> str | None:
    """``pipe:[inode]`` when ``fd`` of process ``pid`` is a pipe."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("pipe:") else None


def descriptors_beyond_stdio(pid: int) -> list[str]:
    """What ``pid``'s descriptors above 2 point at, leaving out the files its interpreter reads.

    A just-started reaper may still be loading: its interpreter then holds the
    program or a standard-library module open for a moment (a regular file under
    the Python installation or ``transports/``). Those are its own; anything else
    (a socket, another pipe, an inherited file) would be a descriptor it got from
    the broker.
    """
    own_files = (sys.base_prefix, sys.prefix, str(Path(transports.__file__).parent))
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) <= 2:
            continue
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.startswith(own_files):
            continue
        targets.append(target)
    return targets


def holders_of(pipe: str, pid: int | str) -> list[str]:
    return [fd for fd in os.listdir(f"/proc/{pid}/fd") if pipe_of(pid, fd) == pipe]


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


@LINUX_ONLY
async def test_the_reaper_runs_while_groups_are_watched_and_leaks_nothing(
    child_env: dict[str, str],
) -> None:
    reaper = current_group_reaper()
    assert reaper.pid is None, "no reaper before the first spawn"
    fds_before = transports.open_fd_count()
    with trio.fail_after(HANG_GUARD_S):
        async with running(SLEEPER, child_env) as (_a, first):
            reaper_pid = reaper.pid
            assert reaper_pid is not None and parent_of(reaper_pid) == os.getpid()
            assert os.getsid(reaper_pid) == reaper_pid, "its own session: no terminal signals"
            # The reaper holds stdio and the read end; we hold the only write end.
            [pipe] = {
                p for fd in os.listdir(f"/proc/{reaper_pid}/fd") if (p := pipe_of(reaper_pid, fd))
            }
            assert sorted(os.listdir(f"/proc/{reaper_pid}/fd"), key=int)[:3] == ["0", "1", "2"]
            assert descriptors_beyond_stdio(reaper_pid) == [pipe]
            assert len(holders_of(pipe, "self")) == 1
            assert holders_of(pipe, first.pid) == [], "a backend never inherits the pipe"
            async with running(SLEEPER, child_env) as (_b, second):
                assert reaper.pid == reaper_pid, "one reaper for every group"
                assert reaper.watched == {first.pid, second.pid}
                assert holders_of(pipe, second.pid) == []
            assert reaper.watched == {first.pid}, "forgotten once reaped"
        assert reaper.pid is None, "the last forget stops the reaper"
        assert parent_of(reaper_pid) != os.getpid(), "and reaps it: no zombie"
    assert transports.open_fd_count() == fds_before


@LINUX_ONLY
async def test_a_sigkilled_broker_takes_every_group_even_after_its_reaper_was_replaced(
    child_env: dict[str, str],
) -> None:
    with trio.fail_after(HANG_GUARD_S):
        async with running(MINI_BROKER, child_env, WITH_GRANDCHILD) as (channel, broker):
            report = json.loads(await body_of(channel))
            first_reaper, second_reaper = report["reapers"]
            assert first_reaper != second_reaper
            assert report["watched"] == sorted(report["children"]), "re-told every group"
            victims = [*report["children"], *report["grandchildren"], second_reaper]
            for child, grandchild in zip(report["children"], report["grandchildren"], strict=True):
                assert os.getpgid(grandchild) == child
            pidfds = [open_pidfd(pid) for pid in victims]
            try:
                os.kill(broker.pid, signal.SIGKILL)
                assert await broker.wait() == -signal.SIGKILL
                for pidfd in pidfds:
                    await trio.lowlevel.wait_readable(pidfd)
            finally:
                for pidfd in pidfds:
                    reap_leftover(pidfd)


def test_only_real_group_ids_can_be_watched() -> None:
    reaper = GroupReaper()
    for pgid in (0, 1, -5):
        with pytest.raises(ValueError, match="cannot be watched"):
            reaper.watch(pgid)
    assert reaper.pid is None and reaper.watched == frozenset()
    reaper.forget(12345)  # unknown: nothing happens
    assert reaper.pid is None
