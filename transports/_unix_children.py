"""The child processes of this process, as the kernel sees them (Unix).

What this module does: ``child_processes`` lists every process whose parent is
this process and that has not been reaped yet (zombies included: an unreaped
child is still a leak), with its command line, read from ``/proc`` on Linux.

What it does not do: start, signal or reap children (``_unix_spawn`` and trio's
process APIs do), or list grandchildren. Where there is no ``/proc`` (macOS, the
BSDs without procfs) it answers ``None`` rather than guessing.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_children is part of the Unix transport"

import os

#: Where Linux publishes one directory per process.
_PROC = "/proc"


def child_processes() -> dict[int, str] | None:
    """Pid -> command line of this process's living or unreaped children; ``None`` if unknown.

    A zombie has no command line left; its entry is its short name in brackets,
    as ``ps`` shows it (``[python3]``).
    """
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return None
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        base = os.path.join(_PROC, entry)
        try:
            with open(os.path.join(base, "stat"), "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue  # exited (and reaped) meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        name, _, rest = stat.rpartition(")")
        fields = rest.split()
        if len(fields) < 2 or int(fields[1]) != me:
            continue
        found[int(entry)] = _command_line(base) or f"[{name.partition('(')[2]}]"
    return found


def _command_line(base: str) -> str:
    try:
        with open(os.path.join(base, "cmdline"), "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
