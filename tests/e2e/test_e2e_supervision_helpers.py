"""Shared helpers of the supervision and admin end-to-end tests (this module has no tests).

- ``watch_events``: every lifecycle event of an in-process broker from a known
  moment on, in order, with ``wait_for`` to synchronise on one;
- ``start_serve``: ``rpbroker serve`` as a real child process, with its log lines
  collected so a test can synchronise on the broker's own events;
- ``run_cli``: one ``rpbroker`` command as a real child process;
- ``pid_gone`` / ``wait_pids_gone``: whether an external process has disappeared;
- ``admin_exchange``: one hand-made admin frame and its reply on a raw connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

import rpbroker
import transports
from rpbroker.events import EventKind, LifecycleEvent
from rpbroker.wire import AdminReply, AdminRequest
from rpbroker.wire.codes import FrameKind
from rpbroker.wire.frames import check_envelope, decode, decode_frame, encode, framed, request
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body
from rpbroker.wire.protocols import PayloadProtocol

from .support import Workspace

# -- lifecycle events of an in-process broker -----------------------------------------

#: The transitions of a backend's life (not Hellos, handoffs or broadcasts).
LIFECYCLE_KINDS = frozenset(
    {
        EventKind.SPAWNING,
        EventKind.RUNNING,
        EventKind.SPAWN_FAILED,
        EventKind.CRASHED,
        EventKind.RETRYING,
        EventKind.UNAVAILABLE,
        EventKind.RECOVERED,
        EventKind.IDLE_QUIESCE,
        EventKind.DRAINING,
        EventKind.STOPPED,
    }
)


class EventWatch:
    """The events a broker emitted since the watch started, in emission order."""

    def __init__(self, broker: rpbroker.Broker) -> None:
        self._broker = broker
        self.events: list[LifecycleEvent] = []
        self._changed = trio.Event()

    async def _pump(self) -> None:
        async for event in self._broker.iter_events():
            self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()

    def of(self, kind: EventKind, service: str | None = None) -> list[LifecycleEvent]:
        return [
            e
            for e in self.events
            if e.kind is kind and (service is None or e.service_name == service)
        ]

    def kinds(self, service: str | None = None) -> list[EventKind]:
        """Kinds of the backend lifecycle transitions, in order."""
        return [
            e.kind
            for e in self.events
            if e.kind in LIFECYCLE_KINDS and (service is None or e.service_name == service)
        ]

    async def wait_for(
        self,
        kind: EventKind,
        predicate: Callable[[LifecycleEvent], bool] | None = None,
        *,
        count: int = 1,
    ) -> LifecycleEvent:
        """Wait until ``count`` events of ``kind`` (matching ``predicate``) were seen."""
        while True:
            matching = [
                e for e in self.events if e.kind is kind and (predicate is None or predicate(e))
            ]
            if len(matching) >= count:
                return matching[count - 1]
            await self._changed.wait()


@asynccontextmanager
async def watch_events(broker: rpbroker.Broker) -> AsyncIterator[EventWatch]:
    """Record every event emitted inside the block (the subscription exists on entry)."""
    watch = EventWatch(broker)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch._pump)
        # Once every task is blocked, the pump is parked on its subscription.
        await trio.testing.wait_all_tasks_blocked()
        yield watch
        nursery.cancel_scope.cancel()


# -- external processes -----------------------------------------------------------------


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_pids_gone(pids: list[int]) -> None:
    """Wait for external processes to disappear (the one place where polling is fair)."""
    while not all(pid_gone(pid) for pid in pids):
        await trio.sleep(0.05)


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


async def cli_json(*args: str) -> dict[str, Any]:
    """Run a ``--json`` CLI command that must succeed; return its document."""
    result = await run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@attrs.define
class ServeProcess:
    """A running ``rpbroker serve`` child and the log lines it has written so far."""

    process: trio.Process
    socket: str
    lines: list[str] = attrs.field(factory=list)
    #: Set once its stderr has ended (it exited): waiting for more lines fails then.
    ended: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def _end(self) -> None:
        self.ended = True
        self._changed.set()

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    def matching(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    async def wait_for_line(self, needle: str, *, count: int = 1) -> str:
        """Wait until ``count`` log lines contain ``needle``; return the first of them.

        Raises ``AssertionError`` if the process ends first.
        """
        while self.count(needle) < count:
            if self.ended:
                raise AssertionError(f"serve ended without {needle!r}:\n" + "\n".join(self.lines))
            await self._changed.wait()
        return self.matching(needle)[0]


async def start_serve_process(
    nursery: trio.Nursery,
    args: list[str],
    *,
    socket: str = "",
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """Start ``rpbroker serve ARGS``; return once it says it serves.

    Its stderr is read to the end in ``nursery``; a process still running when that
    reading is cancelled (the test failed) is killed and reaped.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rpbroker", "serve", *args], stderr=subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    stderr = process.stderr
    serve = ServeProcess(process=process, socket=socket)

    async def read_lines() -> None:
        pending = b""
        try:
            async with stderr:
                while chunk := await stderr.receive_some():
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        serve._add(line.decode(errors="replace"))
            if pending:
                serve._add(pending.decode(errors="replace"))
            await process.wait()  # end of its stderr: it is exiting; reap it
        finally:
            serve._end()
            if process.returncode is None:
                # The test failed while the broker ran: leave no process behind.
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()

    nursery.start_soon(read_lines)
    await serve.wait_for_line("serving on")
    return serve


async def start_serve(
    nursery: trio.Nursery,
    workspace: Workspace,
    *extra: str,
    log_level: str = "WARNING",
) -> ServeProcess:
    """Start ``rpbroker serve`` on the workspace; return once it says it serves."""
    args = [
        "--socket", workspace.socket,
        "--services", str(workspace.services),
        "--runtime-dir", str(workspace.runtime),
        "--log-level", log_level,
        *extra,
    ]  # fmt: skip
    return await start_serve_process(nursery, args, socket=workspace.socket)


# -- admin on a raw connection ----------------------------------------------------------------


def admin_frame(verb: int, *, json_output: bool = False, request_id: int = 5) -> bytes:
    """A framed AdminRequest for any verb number, known to the schema or not."""
    req = AdminRequest(json=json_output)
    req.verb = verb  # type: ignore[assignment]  # open enum: unknown numbers are kept
    return framed(request(PayloadProtocol.ADMIN, encode(req), request_id=request_id))


async def read_admin_reply(stream: trio.abc.Stream, *, request_id: int = 5) -> AdminReply:
    frame = decode_frame(await read_frame_body(stream, MAX_FRAME_BYTES))
    assert (
        check_envelope(frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.ADMIN)
        is None
    )
    assert frame.request_id == request_id
    return decode(AdminReply, frame.payload)


async def admin_exchange(socket: str, verb: int, *, json_output: bool = False) -> AdminReply:
    """Send one admin frame, read the reply, and wait until the broker closed its end."""
    stream = await transports.connect(socket)
    async with stream:
        await stream.send_all(admin_frame(verb, json_output=json_output))
        reply = await read_admin_reply(stream)
        assert await stream.receive_some(1) == b"", "the broker closes after one reply"
    return reply


def json_body(reply: AdminReply, command: str) -> dict[str, Any]:
    """The JSON body of an admin reply, after checking the common envelope."""
    assert reply.content_type == "application/json"
    body: dict[str, Any] = json.loads(reply.body)
    assert_envelope(body, command)
    return body


def assert_envelope(body: dict[str, Any], command: str) -> None:
    assert body["schema_version"] == 1
    assert body["command"] == command
    assert isinstance(body["generated_at_unix_ms"], int)
    assert body["generated_at_unix_ms"] > 1_600_000_000_000
