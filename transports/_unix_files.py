"""Reading a small file that must be private to the current user, without ever waiting.

What this module does: ``read_private_file`` refuses, before opening it, a path that
``lstat`` shows is not a regular file (symbolic link, FIFO, device, socket,
directory); then opens it with ``O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY |
O_CLOEXEC`` and checks again with ``fstat`` on that descriptor, so a file swapped
in between the two steps is caught and the checks and the bytes are about the
same file: it must be a regular file, owned by the euid, with no group or other
permission bits. Then it reads at most ``limit_bytes + 1`` bytes, so the caller
can tell an oversize file without this module ever reading more than that.
Failures of the rule raise ``InsecurePathError`` naming the path, the problem and
the command that fixes it.

Why nothing here can block: a FIFO is refused by ``lstat`` before any ``open``;
one swapped in afterwards opens at once because of ``O_NONBLOCK`` (a FIFO open
for reading otherwise waits for a writer) and is refused by ``fstat`` before any
read. ``O_NOFOLLOW`` makes a symbolic link swapped in fail with ``ELOOP``. A
regular file's read is bounded by ``limit_bytes`` (``O_NONBLOCK`` is cleared once
``fstat`` proved the file regular, so no file system answers a read with
``EAGAIN``).

What it does not do: parse the bytes or decide what an oversize file means (the
caller compares the length with its own limit), or bound the time a hung network
file system takes to answer ``lstat``/``read`` (no Unix call on a regular file
can be made non-blocking).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_files is part of the Unix transport"

import errno
import os
import stat

from transports._interface import InsecurePathError
from transports._unix_paths import check_owner_and_mode

#: Flags of the open: read only, never wait (FIFO), never follow a final symbolic
#: link, never acquire a controlling terminal, never leak into a child.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC

#: Mode a private file should have: owner read/write only.
_PRIVATE_FILE_MODE = 0o600

#: Size of one read call, bytes (a definition usually fits in one).
_READ_CHUNK_BYTES = 64 * 1024

#: What a non-regular file is, for messages, by its ``stat`` type test.
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_unless_private_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        fix = (
            "replace the link with the file itself"
            if stat.S_ISLNK(st.st_mode)
            else f"remove it (rm -r {path}) and write a regular file in its place"
        )
        raise InsecurePathError(path, f"is {kind}; only regular files are read", fix)
    check_owner_and_mode(
        path,
        st,
        private_mode=_PRIVATE_FILE_MODE,
        owner_fix=f"run: chown {os.geteuid()} {path}",
    )


def read_private_file(path: str, limit_bytes: int) -> bytes | None:
    """The first ``limit_bytes + 1`` bytes of the private regular file ``path``.

    Returns ``None`` when ``path`` does not exist. Raises ``InsecurePathError`` when
    it is not a regular file, is owned by another user, or grants group/other
    access; ``OSError`` for other failures (permission, I/O). A result longer than
    ``limit_bytes`` means the file is larger than the caller's limit.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    _refuse_unless_private_regular(path, before)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None  # removed since the lstat
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symbolic link since the lstat
            raise InsecurePathError(
                path,
                "is a symbolic link; only regular files are read",
                "replace the link with the file itself",
            ) from None
        raise
    try:
        _refuse_unless_private_regular(path, os.fstat(fd))
        # A regular file: O_NONBLOCK has done its job (the open could not wait) and
        # is cleared so no file system can answer a read with EAGAIN.
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        remaining = limit_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, _READ_CHUNK_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
