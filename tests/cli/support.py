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

import trio

from ..e2e.test_e2e_supervision_helpers import ServeProcess, start_serve_process

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


async def start_serve(
    nursery: trio.Nursery, *args: str, env: Mapping[str, str] | None = None
) -> ServeProcess:
    """Start ``rpbroker serve ARGS`` in ``environment()`` (or ``env``); see
    ``start_serve_process``."""
    return await start_serve_process(
        nursery, list(args), env=dict(env) if env is not None else environment()
    )


def write_echo_service(services: Path, name: str = "echo") -> None:
    """A service running ``examples/echo_backend.py`` (it uses ``run_backend``)."""
    definition = services / f"{name}.toml"
    definition.write_text(
        f'service_name = "{name}"\n'
        f'command = ["{sys.executable}", "{ECHO_BACKEND}"]\n'
        "idle_timeout_secs = 300\n"
    )
    definition.chmod(0o600)  # definitions must be private to the broker's user
