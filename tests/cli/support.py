"""Helpers for the command-line tests: run ``rpbroker`` as a child process, read its logs.

Every command here is the real ``rpbroker`` console entry point (``python -m
rpbroker``) in its own process, with an environment the test chooses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

REPO = Path(__file__).resolve().parents[2]
ECHO_BACKEND = REPO / "examples" / "echo_backend.py"

#: One logfmt pair: a bare key, ``=``, then a bare word or a JSON-quoted string.
_PAIR = r'[A-Za-z_][A-Za-z0-9_.]*=(?:"(?:[^"\\]|\\.)*"|[^\s"=\\]*)'
_LINE = re.compile(rf"{_PAIR}(?: {_PAIR})*")
_PAIRS = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=\\]*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """The pairs of one ``key=value`` line; raises ``AssertionError`` if it is not one."""
    assert _LINE.fullmatch(line), f"not a key=value line: {line!r}"
    pairs: dict[str, str] = {}
    for key, raw in _PAIRS.findall(line):
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
    assert list(pairs)[:3] == ["ts", "level", "logger"], line
    return pairs


def environment(**changes: str | None) -> dict[str, str]:
    """This process's environment with ``changes`` (``None`` removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPBROKER_")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


async def run_rpbroker(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one ``rpbroker`` command to completion and capture its output."""
    result = await trio.run_process(
        [sys.executable, "-m", "rpbroker", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dict(env) if env is not None else environment(),
        cwd=cwd,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


@attrs.define
class Served:
    """A running ``rpbroker serve`` and the stderr lines it has written so far."""

    process: trio.Process
    lines: list[str] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    ended: trio.Event = attrs.field(factory=trio.Event)

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def end(self) -> None:
        self.ended.set()
        self._changed.set()

    def matching(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    async def wait_for_line(self, needle: str) -> str:
        """The first stderr line containing ``needle``, once it has been written."""
        while not self.matching(needle):
            if self.ended.is_set():
                raise AssertionError(f"serve ended without {needle!r}:\n" + "\n".join(self.lines))
            await self._changed.wait()
        return self.matching(needle)[0]


async def start_serve(
    nursery: trio.Nursery, *args: str, env: Mapping[str, str] | None = None
) -> Served:
    """Start ``rpbroker serve ARGS``; return once it says where it serves.

    Its stderr is read to the end in ``nursery``; a process still running when the
    nursery is cancelled (a failed test) is killed and reaped.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rpbroker", "serve", *args],
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else environment(),
    )
    assert process.stderr is not None
    stderr = process.stderr
    served = Served(process)

    async def read_lines() -> None:
        pending = b""
        try:
            async with stderr:
                while chunk := await stderr.receive_some():
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        served.add(line.decode(errors="replace"))
            if pending:
                served.add(pending.decode(errors="replace"))
            await process.wait()
        finally:
            served.end()
            if process.returncode is None:
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()

    nursery.start_soon(read_lines)
    await served.wait_for_line("serving on")
    return served


def write_echo_service(services: Path, name: str = "echo") -> None:
    """A service running ``examples/echo_backend.py`` (it uses ``run_backend``)."""
    (services / f"{name}.toml").write_text(
        f'service_name = "{name}"\n'
        f'command = ["{sys.executable}", "{ECHO_BACKEND}"]\n'
        "idle_timeout_secs = 300\n"
    )
