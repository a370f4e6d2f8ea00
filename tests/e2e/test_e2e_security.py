"""Issue 10's attack campaign against real brokers, directories and processes.

Each failing check of the campaign gets its end-to-end test here: an insecure or
over-long runtime directory refuses the start with the path and the fix; an
insecure services directory or definition file refuses the start, or the Hello
when it turns insecure later; a FIFO definition blocks nothing; a backend's own
children die with a SIGKILLed broker; a new broker removes exactly the dead
endpoints of a killed one. The tests run as root: other users' files are made
with ``os.chown(path, 65534, 65534)``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import rpbroker
import transports
from rpbroker.wire.codes import AdminVerb, RefusalCode
from transports._unix import SUN_PATH_MAX_BYTES

from .support import Workspace, child_pids, round_trip
from .test_e2e_supervision_helpers import (
    admin_exchange,
    cli_json,
    json_body,
    run_cli,
    start_serve,
)

NOBODY = 65534
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="pidfd is Linux-only")

#: Bytes of "/" + a backend endpoint name: rpb-v1-<16 hex>-be-<32 hex>.sock.
BACKEND_NAME_BYTES = 65


def serve_args(workspace: Workspace, *, runtime: Path, socket_path: Path) -> list[str]:
    return [
        "serve",
        "--socket", str(socket_path),
        "--services", str(workspace.services),
        "--runtime-dir", str(runtime),
    ]  # fmt: skip


async def refused_start(workspace: Workspace, runtime: Path, socket_path: Path) -> str:
    """Run ``rpbroker serve``, which must refuse to start; return its stderr."""
    with trio.fail_after(30):
        result = await run_cli(*serve_args(workspace, runtime=runtime, socket_path=socket_path))
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not socket_path.exists(), "nothing was bound"
    return result.stderr


def path_of_length(root: Path, total_bytes: int) -> Path:
    name = "r" * (total_bytes - len(os.fsencode(root)) - 1)
    path = root / name
    assert len(os.fsencode(path)) == total_bytes
    return path


# -- the runtime directory -------------------------------------------------------------


@pytest.mark.parametrize("flaw", ["mode-0777", "mode-0750", "other-owner", "symlink"])
async def test_an_insecure_runtime_directory_refuses_to_start_with_the_path_and_the_fix(
    workspace: Workspace, flaw: str
) -> None:
    # The broker socket lives elsewhere, so only the broker's own check can catch it.
    runtime = workspace.root / "rt"
    if flaw == "symlink":
        real = workspace.root / "real"
        real.mkdir(mode=0o700)
        runtime.symlink_to(real, target_is_directory=True)
        expected = f"{runtime}: is a symbolic link, not a directory; remove the link (rm {runtime})"
    else:
        runtime.mkdir(mode=0o700)
        if flaw == "other-owner":
            os.chown(runtime, NOBODY, NOBODY)
            expected = (
                f"{runtime}: is owned by uid {NOBODY}, not by the current user "
                f"(uid {os.geteuid()}); remove it (rm -r {runtime}) or run: "
                f"chown {os.geteuid()} {runtime}"
            )
        else:
            mode = int(flaw.removeprefix("mode-"), 8)
            runtime.chmod(mode)
            expected = (
                f"{runtime}: has mode {mode:04o}, which gives group or other users access; "
                f"run: chmod 700 {runtime}"
            )
    stderr = await refused_start(workspace, runtime, workspace.root / "broker.sock")
    assert f"rpbroker: {expected}" in stderr
    # In-process embedding refuses the same way, before binding anything.
    config = workspace.config(runtime_dir=runtime, socket_path=str(workspace.root / "b.sock"))
    with pytest.RaisesGroup(
        transports.InsecurePathError, allow_unwrapped=True, flatten_subgroups=True
    ):
        async with rpbroker.open_broker(config):
            pass  # pragma: no cover - the broker must not start
    assert not (workspace.root / "b.sock").exists()


async def test_a_missing_runtime_directory_is_created_private_and_used(
    echo_workspace: Workspace,
) -> None:
    runtime = echo_workspace.root / "fresh"
    config = echo_workspace.config(
        runtime_dir=runtime, socket_path=str(echo_workspace.root / "b.sock")
    )
    with trio.fail_after(30):
        async with rpbroker.open_broker(config) as broker:
            st = runtime.lstat()
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
            assert st.st_uid == os.geteuid()
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"in") == b"in"
            [handle] = list(broker.backends)
            assert Path(handle.endpoint).parent == runtime


async def test_a_runtime_directory_too_long_for_endpoints_refuses_with_the_byte_counts(
    workspace: Workspace,
) -> None:
    limit = SUN_PATH_MAX_BYTES
    longest = limit - BACKEND_NAME_BYTES
    runtime = path_of_length(workspace.root, longest + 1)
    stderr = await refused_start(workspace, runtime, workspace.root / "broker.sock")
    assert (
        f"runtime directory {runtime} is {longest + 1} bytes long, so backend endpoints in it "
        f"would be {limit + 1} bytes, more than the {limit}-byte socket path limit (sun_path) "
        f"of this platform; use a runtime directory of at most {longest} bytes"
    ) in stderr
    assert not runtime.exists(), "nothing is created for a directory that cannot be used"


async def test_the_longest_runtime_directory_that_fits_serves_hellos(workspace: Workspace) -> None:
    # Before the check, the first Hello of such a broker crashed it.
    workspace.add_service("echo")
    limit = SUN_PATH_MAX_BYTES
    runtime = path_of_length(workspace.root, limit - BACKEND_NAME_BYTES)
    config = workspace.config(runtime_dir=runtime, socket_path=str(workspace.root / "b.sock"))
    with trio.fail_after(30):
        async with rpbroker.open_broker(config) as broker:
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"fits") == b"fits"
            [handle] = list(broker.backends)
            assert len(os.fsencode(handle.endpoint)) == limit


# -- the services directory and its definitions ----------------------------------------------


@pytest.mark.parametrize("flaw", ["other-owner", "symlink", "mode-0755"])
async def test_an_insecure_services_directory_refuses_to_start(
    workspace: Workspace, flaw: str
) -> None:
    workspace.add_service("echo")
    if flaw == "other-owner":
        os.chown(workspace.services, NOBODY, NOBODY)
        services, expected = workspace.services, f"is owned by uid {NOBODY}"
    elif flaw == "symlink":
        services = workspace.root / "svc-link"
        services.symlink_to(workspace.services, target_is_directory=True)
        expected = (
            "is a symbolic link (links are not followed); definitions are only loaded from a "
            "directory private to the broker's user: "
            f"use the directory itself ({workspace.services})"
        )
    else:
        workspace.services.chmod(0o755)
        services, expected = workspace.services, f"run: chmod 700 {workspace.services}"
    with trio.fail_after(30):
        result = await run_cli(
            "serve", "--socket", workspace.socket, "--services", str(services),
            "--runtime-dir", str(workspace.runtime),
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert f"rpbroker: services directory {services} " in result.stderr
    assert expected in result.stderr, result.stderr
    assert not Path(workspace.socket).exists()


async def test_insecure_definition_files_refuse_to_start_naming_each_one(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    workspace.add_service("foreign")
    os.chown(workspace.services / "foreign.toml", NOBODY, NOBODY)
    workspace.add_service("shared")
    (workspace.services / "shared.toml").chmod(0o640)
    (workspace.services / "linked.toml").symlink_to(workspace.services / "echo.toml")
    os.mkfifo(workspace.services / "fifo.toml", 0o600)
    with trio.fail_after(30):
        result = await run_cli(
            "serve", "--socket", workspace.socket, "--services", str(workspace.services),
            "--runtime-dir", str(workspace.runtime),
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    svc = workspace.services
    assert f"4 definition file(s) in {svc} are not regular files private" in result.stderr
    for line in [
        f"{svc}/fifo.toml: is a FIFO (named pipe); only regular files are read; remove it",
        f"{svc}/foreign.toml: is owned by uid {NOBODY}, not by the current user "
        f"(uid {os.geteuid()}); run: chown {os.geteuid()} {svc}/foreign.toml",
        f"{svc}/linked.toml: is a symbolic link; only regular files are read; "
        "replace the link with the file itself",
        f"{svc}/shared.toml: has mode 0640, which gives group or other users access; "
        f"run: chmod 600 {svc}/shared.toml",
    ]:
        assert line in result.stderr, result.stderr
    assert not Path(workspace.socket).exists()


async def test_invalid_definitions_are_logged_at_start_and_the_good_ones_served(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    workspace.add_service("broken", idle_timeout_secs=-1)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace)
            [logged] = [line for line in serve.lines if "rpbroker.preflight" in line]
            assert "level=warning" in logged
            assert f"{workspace.services}/broken.toml: field 'idle_timeout_secs':" in logged
            assert "must be a finite number of seconds greater than 0" in logged
            async with rpbroker.connect(
                "echo", "1.0.0", broker=serve.socket, hello_skip=False
            ) as stream:
                assert await round_trip(stream, b"good") == b"good"
            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection(
                    "broken", "1.0.0", broker=serve.socket, hello_skip=False
                )
            assert info.value.code is RefusalCode.SERVICE_UNKNOWN
            assert "idle_timeout_secs" in info.value.reason
            await serve.wait_for_line("Hello for service 'broken' refused (SERVICE_UNKNOWN)")
            [refused] = [line for line in serve.lines if "Hello for service 'broken'" in line]
            assert (
                "level=warning" in refused and "broken.toml: field 'idle_timeout_secs'" in refused
            )
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


async def test_a_directory_or_definition_turning_insecure_later_refuses_the_hello(
    echo_workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    definition = echo_workspace.services / "echo.toml"
    spare = echo_workspace.root / "echo.toml"
    spare.write_bytes(definition.read_bytes())
    spare.chmod(0o600)

    async def hello() -> rpbroker.RefusedError | None:
        try:
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
            ) as stream:
                assert await round_trip(stream, b"ok") == b"ok"
        except rpbroker.RefusedError as exc:
            return exc
        return None

    def restore() -> None:
        os.chown(echo_workspace.services, os.geteuid(), os.getegid())
        definition.unlink()
        definition.write_bytes(spare.read_bytes())
        definition.chmod(0o600)

    def symlink_instead() -> None:
        definition.unlink()
        definition.symlink_to(spare)

    changes: dict[str, tuple[Callable[[], None], str]] = {
        "directory of another user": (
            lambda: os.chown(echo_workspace.services, NOBODY, NOBODY),
            f"owned by uid {NOBODY}",
        ),
        "definition of another user": (
            lambda: os.chown(definition, NOBODY, NOBODY),
            f"echo.toml: is owned by uid {NOBODY}",
        ),
        "definition readable by others": (
            lambda: definition.chmod(0o604),
            "echo.toml: has mode 0604",
        ),
        "definition replaced by a symlink": (symlink_instead, "echo.toml: is a symbolic link"),
    }
    caplog.set_level(logging.WARNING, logger="rpbroker.broker")
    with trio.fail_after(40):
        async with rpbroker.open_broker(echo_workspace.config()) as broker:
            assert await hello() is None
            for name, (change, reason) in changes.items():
                change()
                refused = await hello()
                assert refused is not None, name
                assert refused.code is RefusalCode.SERVICE_UNKNOWN, name
                assert reason in refused.reason, (name, refused.reason)
                assert any(
                    r.levelno == logging.WARNING and reason in r.getMessage()
                    for r in caplog.records
                ), name
                restore()
                assert await hello() is None, f"{name}: served again once repaired"


async def test_a_fifo_definition_is_refused_at_once_and_blocks_nothing(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    fifo = workspace.services / "slow.toml"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace)
            os.mkfifo(fifo, 0o600)  # after the start: only the Hello path can meet it
            answered: list[str] = []

            async def slow_hello() -> None:
                with pytest.raises(rpbroker.RefusedError) as info:
                    await rpbroker.open_connection(
                        "slow", "1.0.0", broker=serve.socket, hello_skip=False
                    )
                assert info.value.code is RefusalCode.SERVICE_UNKNOWN
                assert "is a FIFO (named pipe); only regular files are read" in info.value.reason
                answered.append("slow")

            async def status() -> None:
                reply = await admin_exchange(serve.socket, AdminVerb.STATUS, json_output=True)
                assert json_body(reply, "status")["accepting_hello"] is True
                answered.append("status")

            async def other_hello() -> None:
                async with rpbroker.connect(
                    "echo", "1.0.0", broker=serve.socket, hello_skip=False
                ) as stream:
                    assert await round_trip(stream, b"meanwhile") == b"meanwhile"
                answered.append("echo")

            # A broker frozen on the FIFO would leave all three waiting until the deadline.
            with trio.fail_after(20):
                async with trio.open_nursery() as clients:
                    clients.start_soon(slow_hello)
                    clients.start_soon(status)
                    clients.start_soon(other_hello)
            assert sorted(answered) == ["echo", "slow", "status"]
            # Nobody holds the FIFO open for reading: the broker never opened it.
            with pytest.raises(OSError) as info:
                os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            assert info.value.errno == errno.ENXIO
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


# -- process groups and stale endpoints of a SIGKILLed broker -----------------------------------


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


@LINUX_ONLY
async def test_a_backends_own_children_die_with_a_sigkilled_broker(workspace: Workspace) -> None:
    pids_file = workspace.root / "pids"
    workspace.add_service("family", mode="grandchild", env={"RPB_TEST_PIDS": str(pids_file)})
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace)
            async with rpbroker.connect("family", "1.0.0", broker=serve.socket) as stream:
                assert await round_trip(stream, b"hi") == b"hi"
            [backend, grandchild] = map(int, pids_file.read_text().split())
            assert os.getpgid(grandchild) == backend, "the grandchild is in the backend's group"
            # The broker's children: the backend and the process-group reaper.
            [reaper] = children_of(serve.process.pid) - {backend}
            pidfds = [os.pidfd_open(pid) for pid in (backend, grandchild, reaper)]
            try:
                serve.process.kill()
                assert await serve.process.wait() == -signal.SIGKILL
                with trio.fail_after(10):
                    for pidfd in pidfds:
                        await trio.lowlevel.wait_readable(pidfd)  # readable: it exited
            finally:
                for pidfd in pidfds:
                    # Leave nothing behind if the test failed (a no-op once they exited).
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    os.close(pidfd)
    assert child_pids() == set()


@LINUX_ONLY
async def test_a_new_broker_removes_only_the_dead_endpoints_of_a_sigkilled_one(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    runtime = workspace.runtime
    user = transports.user_hash()
    live_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                first = await start_serve(nursery, workspace)
                async with rpbroker.connect("echo", "1.0.0", broker=first.socket) as stream:
                    assert await round_trip(stream, b"x") == b"x"
                [row] = (await cli_json("status", "--socket", first.socket))["backends"]
                stale, backend = Path(row["backend_pipe"]), row["pid"]
                pidfd = os.pidfd_open(backend)
                # Broker and backend die at the same instant (a stopped backend
                # runs no code; the broker's death signal kills it anyway):
                # otherwise the backend can see its control channel close before
                # that signal arrives and tidy its endpoint away itself.
                os.kill(backend, signal.SIGSTOP)
                first.process.kill()
                await first.process.wait()
                await trio.lowlevel.wait_readable(pidfd)  # the backend died with its broker
                os.close(pidfd)
                assert stale.is_socket(), "the killed broker's backend left its endpoint"

                # What must survive the sweep, each for its own reason.
                def name(tag: str, *, owner: str = user) -> Path:
                    return runtime / f"rpb-v1-{owner}-be-{tag * 32}.sock"

                live = name("1")
                live_listener.bind(str(live))
                live_listener.listen(1)
                foreign = name("2")
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                    dead.bind(str(foreign))
                os.chown(foreign, NOBODY, NOBODY)
                regular = name("3")
                regular.write_bytes(b"not a socket")
                link = name("4")
                link.symlink_to(stale)
                other_user = name("5", owner="0" * 16)
                unrelated = runtime / "keep.sock"
                for path in (other_user, unrelated):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                        dead.bind(str(path))
                keep = [live, foreign, regular, link, other_user, unrelated]
                before = {path: path.lstat() for path in keep}

                second = await start_serve(nursery, workspace, log_level="INFO")
                assert not os.path.lexists(stale), "the dead endpoint was removed"
                assert second.count(f"removed the stale endpoint {stale}") == 1
                assert second.count("removed the stale endpoint") == 1
                for path in keep:
                    after = path.lstat()
                    assert (after.st_ino, after.st_mode, after.st_uid) == (
                        before[path].st_ino,
                        before[path].st_mode,
                        before[path].st_uid,
                    ), path
                async with rpbroker.connect("echo", "1.0.0", broker=second.socket) as stream:
                    assert await round_trip(stream, b"y") == b"y"
                second.process.send_signal(signal.SIGTERM)
                assert await second.process.wait() == 0
    finally:
        live_listener.close()
