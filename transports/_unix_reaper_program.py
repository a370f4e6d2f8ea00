"""The reaper program: SIGKILLs a broker's backend process groups once the broker is gone.

What this module does: run as ``python -I -S _unix_reaper_program.py <fd>`` by
``transports._unix_reaper``, it reads fixed-size records from descriptor ``fd``,
the read end of a pipe whose only write end the broker holds: ``b"+"`` and a u32
little-endian process group id to watch that group, ``b"-"`` and an id to forget
it. End of file means every writer is gone, i.e. the broker exited or was killed:
it then sends SIGKILL to every group it still watches and exits with status 0.

What it does not do: import anything outside the standard library (it runs
without site-packages, so it starts fast and cannot be broken by the broker's
environment), talk back, or stop for SIGINT, SIGTERM or SIGHUP (it lives exactly
as long as the pipe's write end; terminal and service-manager signals meant for
the broker must not take the safety net away first). Ids below 2 are never
signalled: ``killpg(0)`` is the caller's own group and ``killpg(1)`` init's.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_reaper_program is part of the Unix transport"

import contextlib
import os
import signal
import struct

#: One record: an operation byte and a process group id (u32 little-endian).
RECORD = struct.Struct("<cI")

#: Operation bytes of a record.
WATCH = b"+"
FORGET = b"-"

#: Smallest process group id that may be signalled (see the module docstring).
MIN_PGID = 2

#: Bytes asked for per read: many records at once.
_READ_BYTES = 4096


def main(argv: list[str]) -> int:
    """Watch groups until end of file on ``argv[1]``, then kill them; returns the exit status."""
    fd = int(argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while chunk := os.read(fd, _READ_BYTES):
        pending += chunk
        whole = len(pending) - len(pending) % RECORD.size
        for operation, pgid in RECORD.iter_unpack(pending[:whole]):
            if operation == WATCH and pgid >= MIN_PGID:
                groups.add(pgid)
            elif operation == FORGET:
                groups.discard(pgid)
        pending = pending[whole:]
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(pgid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
