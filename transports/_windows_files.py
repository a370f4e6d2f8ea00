"""Reading a small private file on Windows: regular files only, never a link.

What this module does: ``read_private_file`` refuses a path that is a symbolic
link, junction or other reparse point, or anything but a regular file, before
opening it; checks the opened file again with ``fstat``; and reads at most
``limit_bytes + 1`` bytes, like the Unix transport's function of the same name.
Refusals raise ``InsecurePathError`` naming the path, the problem and the fix.

What it does not do: check the owner or the ACL (as ``_windows_dirs`` explains,
that is not implemented), or close the window between the check and the open in
which a reparse point could be swapped in (Windows has no ``O_NOFOLLOW``).
"""

from __future__ import annotations

import os
import stat

from transports._interface import InsecurePathError
from transports._windows_api import FILE_ATTRIBUTE_REPARSE_POINT

#: Flags of the open: read only, binary, not inherited by children.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)


def _refuse_unless_regular(path: str, st: os.stat_result) -> None:
    attributes = getattr(st, "st_file_attributes", 0)
    if stat.S_ISLNK(st.st_mode) or attributes & FILE_ATTRIBUTE_REPARSE_POINT:
        raise InsecurePathError(
            path,
            "is a symbolic link, junction or other reparse point; only regular files are read",
            "replace the link with the file itself",
        )
    if not stat.S_ISREG(st.st_mode):
        raise InsecurePathError(
            path,
            "is not a regular file; only regular files are read",
            f"remove it and write a regular file in its place ({path})",
        )


def read_private_file(path: str, limit_bytes: int) -> bytes | None:
    """The first ``limit_bytes + 1`` bytes of the regular file ``path``; ``None`` if missing.

    Raises ``InsecurePathError`` for a link or a non-regular file and ``OSError``
    for other failures.
    """
    try:
        _refuse_unless_regular(path, os.lstat(path))
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        _refuse_unless_regular(path, os.fstat(fd))
        chunks: list[bytes] = []
        remaining = limit_bytes + 1
        while remaining > 0 and (chunk := os.read(fd, remaining)):
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
