"""Backend output capture with real backend processes.

A backend's stdout and stderr are pipes the broker drains line by line: each
line is logged on ``rpbroker.backend`` attributed to service, version, pid and
stream, and kept (the last lines per backend). A backend that floods its output
without newlines still starts (the pipes are always drained) and its over-long
line is cut. A backend that dies before it is ready has the end of its stderr
quoted in the client's refusal and in the spawn-failed event. No descriptor is
left once the backends are gone.
"""

from __future__ import annotations

import logging

import pytest
import trio

import rpbroker
from rpbroker.events import EventKind
from rpbroker.logfmt import KeyValues
from rpbroker.supervisor.output import MAX_LINE_BYTES, OutputStream
from rpbroker.wire.codes import RefusalCode

from .scripted_backend import NOISY_LONG_LINE_BYTES
from .support import Workspace, fd_count, round_trip

GUARD_S = 30


async def test_output_lines_are_logged_and_kept_and_a_flood_never_blocks_the_backend(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    workspace.add_service("noisy", mode="noisy")
    caplog.set_level(logging.INFO, logger="rpbroker.backend")
    before = fd_count()
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            # The backend wrote ~2 MB before serving: it is only ready if the
            # broker drained its pipes meanwhile.
            async with rpbroker.connect("noisy", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"ping") == b"ping"
            [backend] = list(broker.backends)
            pid = backend.pid
            backend.stop()
            await backend.ended.wait()
            lines = broker.backends.output.lines_of("noisy")
    assert fd_count() <= before
    texts = [(line.stream, line.text) for line in lines]
    assert (OutputStream.STDOUT, "hello from stdout") in texts
    assert (OutputStream.STDERR, "hello from stderr") in texts
    assert (OutputStream.STDERR, "after the long line") in texts
    assert (OutputStream.STDOUT, "flood done") in texts
    [long] = [line for line in lines if line.text.startswith("L")]
    assert long.truncated and len(long.text) == MAX_LINE_BYTES < NOISY_LONG_LINE_BYTES
    flood = [line for line in lines if line.text.startswith("F")]
    assert flood and all(line.truncated for line in flood)
    assert all(line.pid == pid and line.service_version == "1.0.0" for line in lines)
    records = [r for r in caplog.records if r.name == "rpbroker.backend"]
    fields = [dict(r.msg.present()) for r in records if isinstance(r.msg, KeyValues)]
    assert {
        "service": "noisy",
        "version": "1.0.0",
        "pid": pid,
        "stream": "stderr",
        "line": "hello from stderr",
    } in fields
    assert all(r.levelno == logging.INFO for r in records)


async def test_a_backend_dying_before_ready_has_its_stderr_tail_in_the_refusal_and_event(
    workspace: Workspace,
) -> None:
    workspace.add_service("broken", mode="traceback-before-ready")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection("broken", "1.0.0", broker=broker.socket_path)
            failed = [e for e in broker.recent_events() if e.kind is EventKind.SPAWN_FAILED]
            kept = broker.backends.output.lines_of("broken")
    assert info.value.code is RefusalCode.BACKEND_SPAWN_FAILED
    reason = info.value.reason
    assert "before becoming ready" in reason
    assert "RuntimeError: configuration file /nonexistent/app.toml is missing" in reason
    assert "loading the configuration" not in reason  # stdout is not quoted
    [event] = failed
    tail = event.details["stderr_tail"]
    assert tail.endswith("RuntimeError: configuration file /nonexistent/app.toml is missing")
    assert len(tail.splitlines()) <= 5
    assert (OutputStream.STDOUT, "loading the configuration") in [
        (line.stream, line.text) for line in kept
    ]
