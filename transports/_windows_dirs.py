"""rpbroker's per-user runtime directory on Windows, and what can be checked about it.

What this module does: ``runtime_dir`` names (and by default creates)
``%LOCALAPPDATA%\\rpbroker\\run``; ``ensure_private_dir`` creates a directory one
level deep and verifies it; ``verify_private_dir`` checks that a path exists,
is a directory, and is neither a symbolic link nor any other reparse point
(junction, mount point), raising ``InsecurePathError`` with the path, the problem
and the fix.

What it does not do: verify the directory's ACL. Unlike the Unix transport, this
does NOT prove that only the current user can read or write the directory: owner
and DACL checks (GetNamedSecurityInfoW) are not implemented yet. The protection
that matters for endpoints does not depend on it, because named pipes live in
the pipe namespace, not in this directory, and carry their own current-user-only
security descriptor. ``%LOCALAPPDATA%`` itself is private to the user on a default
Windows installation.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from transports._interface import InsecurePathError
from transports._windows_api import FILE_ATTRIBUTE_REPARSE_POINT

#: Location under ``%LOCALAPPDATA%``.
RUNTIME_SUBDIR = ("rpbroker", "run")


def default_runtime_dir(environ: Mapping[str, str]) -> Path:
    """``%LOCALAPPDATA%\\rpbroker\\run``; raises ``InsecurePathError`` if the variable is unset."""
    base = environ.get("LOCALAPPDATA")
    if not base:
        raise InsecurePathError(
            "%LOCALAPPDATA%",
            "is not set, so there is no per-user runtime directory",
            "run rpbroker in a normal user session (LOCALAPPDATA is set by Windows at logon)",
        )
    return Path(base).joinpath(*RUNTIME_SUBDIR)


def runtime_dir(create: bool = True, *, environ: Mapping[str, str] | None = None) -> Path:
    """The per-user runtime directory: ``%LOCALAPPDATA%\\rpbroker\\run``.

    With ``create`` the directory (and its parents) is created if missing and then
    checked with ``verify_private_dir``. Without it the path is only computed.
    """
    path = default_runtime_dir(os.environ if environ is None else environ)
    if create:
        os.makedirs(path, exist_ok=True)
        verify_private_dir(path)
    return path


def short_temp_dir() -> Path:
    """A base for temporary directories: ``tempfile.gettempdir()``.

    Endpoints are named pipes, whose names do not depend on directories, so no
    shorter base is needed here. Nothing is created.
    """
    return Path(tempfile.gettempdir())


def ensure_private_dir(path: os.PathLike[str] | str) -> None:
    """Create ``path`` (one level) if it is missing, then ``verify_private_dir`` it.

    A missing parent is reported by the verification rather than created.
    """
    text = os.fspath(path)
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.mkdir(text)
    verify_private_dir(text)


def verify_private_dir(path: os.PathLike[str] | str) -> None:
    """Check that ``path`` is a real directory, not a link or other reparse point.

    Raises ``InsecurePathError``. The ACL is NOT checked (see the module docstring).
    """
    text = os.fspath(path)
    try:
        st = os.lstat(text)
    except FileNotFoundError:
        raise InsecurePathError(
            text, "does not exist", f"create it (mkdir {text}) or let rpbroker create it"
        ) from None
    except OSError as exc:
        raise InsecurePathError(
            text,
            f"cannot be inspected ({exc.strerror})",
            "make it reachable by the current user or choose another directory",
        ) from exc
    attributes = getattr(st, "st_file_attributes", 0)
    if stat.S_ISLNK(st.st_mode) or attributes & FILE_ATTRIBUTE_REPARSE_POINT:
        raise InsecurePathError(
            text,
            "is a symbolic link, junction or other reparse point, not a plain directory",
            f"remove it (rmdir {text}) and let rpbroker create the directory",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError(
            text,
            "is not a directory",
            f"remove it (del {text}) and let rpbroker create the directory",
        )


def mode_is_private(mode: int) -> bool:
    """Windows has no POSIX permission bits; privacy lives in ACLs, not checked yet.

    Always True, so callers do not refuse directories on a check that means
    nothing here. See WINDOWS.md: ACL verification is not implemented.
    """
    return True
