"""Where rpbroker's Unix endpoints live, and who they belong to.

What this module does: derives the current user's identity strings (``current_user``,
``user_hash``), picks and creates the per-user runtime directory, checks that a
directory is private to the user (``verify_private_dir``), and builds endpoint
paths (``broker_endpoint``, ``new_backend_endpoint``) that are valid names and fit
in ``sockaddr_un.sun_path``. It also answers, without touching anything, whether a
directory has room for backend endpoints (``check_backend_endpoint_room``) and
whether a file name is one of this user's backend endpoints
(``is_backend_endpoint_name``, for the stale-endpoint sweep of ``_unix_listen``).

What it does not do: open, bind or connect sockets (``_unix_listen`` and
``_unix_connect`` do), or decide which endpoint a service uses (the broker does).
Apart from ``runtime_dir(create=True)`` and ``ensure_private_dir`` nothing here
touches the file system beyond ``lstat``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_paths is part of the Unix transport"

import hashlib
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from transports._interface import EndpointNameError, InsecurePathError, RuntimeDirTooLongError

#: Usable bytes of ``sockaddr_un.sun_path``: the array is 108 bytes on Linux and
#: 104 on macOS and the BSDs, and one byte is kept for the terminating NUL so the
#: path is also a valid C string for tools that print it.
SUN_PATH_MAX_BYTES = 107 if sys.platform == "linux" else 103

#: Mode of the runtime directory: owner-only (rwx------).
PRIVATE_DIR_MODE = 0o700

#: Permission bits that must be clear on a private directory (any group/other access).
_GROUP_OTHER_BITS = 0o077

#: Prefix shared by every endpoint name (v1 naming, facts §5.1).
_ENDPOINT_PREFIX = "rpb-v1"

#: Hex digits of the user hash (64 bits: collisions between local users are not a
#: security boundary, the directory ownership check is).
_USER_HASH_HEX_CHARS = 16

#: Random bytes in a backend endpoint name (128 bits, unguessable and collision-free).
_BACKEND_NAME_RANDOM_BYTES = 16

#: A backend endpoint's file name: ``rpb-v1-<userhash>-be-<32 hex>.sock``.
_BACKEND_NAME_PATTERN = re.compile(
    rf"{_ENDPOINT_PREFIX}-(?P<user>[0-9a-f]{{{_USER_HASH_HEX_CHARS}}})"
    rf"-be-[0-9a-f]{{{2 * _BACKEND_NAME_RANDOM_BYTES}}}\.sock"
)

#: Allowed service/instance names: the same alphabet as the Hello shape check.
_NAME_PATTERN = re.compile(r"[a-z0-9-]{1,64}")

#: Endpoint kinds accepted by ``broker_endpoint`` and whether each takes a name.
_KINDS_WITH_NAME = {"shared": False, "svc": True, "inst": True}

#: Name of the runtime directory under ``$XDG_RUNTIME_DIR``.
_XDG_SUBDIR = "rpbroker"


def current_user() -> str:
    """The effective uid as a decimal string (what ``PeerIdentity.user`` reports)."""
    return str(os.geteuid())


def user_hash() -> str:
    """16 lowercase hex characters identifying the effective user in endpoint names."""
    digest = hashlib.sha256(f"uid:{os.geteuid()}".encode("ascii")).hexdigest()
    return digest[:_USER_HASH_HEX_CHARS]


def _default_runtime_dir() -> Path:
    uid = os.geteuid()
    if sys.platform == "darwin":
        return Path(os.environ.get("TMPDIR") or "/tmp") / f"rpbroker-{uid}"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / _XDG_SUBDIR
    return Path("/tmp") / f"rpbroker-{uid}"


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory that holds every rpbroker socket.

    ``$XDG_RUNTIME_DIR/rpbroker`` when that variable is set (Linux), else
    ``/tmp/rpbroker-<uid>``; on macOS ``$TMPDIR/rpbroker-<uid>``. With ``create``
    the directory is created with mode 0700 if missing and then verified with
    ``verify_private_dir`` (raising ``InsecurePathError``). Without ``create`` the
    path is only computed: nothing is created or checked.
    """
    path = _default_runtime_dir()
    if create:
        ensure_private_dir(path)
    return path


def ensure_private_dir(path: os.PathLike[str] | str) -> None:
    """Create ``path`` (one level, mode 0700) if it is missing, then verify it.

    Only the last component is created: a missing parent is reported as an
    ``InsecurePathError`` by the verification rather than created with guessed modes.
    """
    text = os.fspath(path)
    try:
        os.mkdir(text, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        pass  # the parent is missing; verify_private_dir reports it
    else:
        # mkdir applied the umask, which may have removed owner bits we need.
        os.chmod(text, PRIVATE_DIR_MODE)
    verify_private_dir(text)


def verify_private_dir(path: os.PathLike[str] | str) -> None:
    """Check that ``path`` is a real directory owned by the euid with no group/other access.

    Raises ``InsecurePathError`` whose message names the path, the problem and the
    command that fixes it. Symbolic links are refused even when they point to a
    good directory: the check is on the path itself (``lstat``).
    """
    text = os.fspath(path)
    try:
        st = os.lstat(text)
    except FileNotFoundError:
        raise InsecurePathError(
            text,
            "does not exist",
            f"create it with: mkdir -m 700 {text}",
        ) from None
    except OSError as exc:
        raise InsecurePathError(
            text,
            f"cannot be inspected ({exc.strerror})",
            "make it reachable by the current user or choose another directory",
        ) from exc
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePathError(
            text,
            "is a symbolic link, not a directory",
            f"remove the link (rm {text}) and let rpbroker create the directory",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError(
            text,
            "is not a directory",
            f"remove it (rm {text}) and let rpbroker create the directory",
        )
    euid = os.geteuid()
    check_owner_and_mode(
        text,
        st,
        private_mode=PRIVATE_DIR_MODE,
        owner_fix=f"remove it (rm -r {text}) or run: chown {euid} {text}",
    )


def check_owner_and_mode(
    path: str, st: os.stat_result, *, private_mode: int, owner_fix: str
) -> None:
    """Raise ``InsecurePathError`` unless ``st`` is owned by the euid with no group/other bits.

    ``owner_fix`` is the advice for another owner; for the mode the advice is to
    ``chmod`` to ``private_mode``.
    """
    euid = os.geteuid()
    if st.st_uid != euid:
        raise InsecurePathError(
            path, f"is owned by uid {st.st_uid}, not by the current user (uid {euid})", owner_fix
        )
    if st.st_mode & _GROUP_OTHER_BITS:
        raise InsecurePathError(
            path,
            f"has mode {stat.S_IMODE(st.st_mode):04o}, which gives group or other users access",
            f"run: chmod {private_mode:o} {path}",
        )


def check_sun_path(path: str) -> None:
    """Raise ``EndpointNameError`` unless ``path`` fits in ``sun_path`` with its NUL."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX_BYTES:
        raise EndpointNameError(
            f"socket path {path!r} is {size} bytes; the limit on this platform is "
            f"{SUN_PATH_MAX_BYTES} bytes (sun_path); use a shorter runtime directory"
        )


def broker_endpoint(
    kind: str = "shared",
    name: str | None = None,
    *,
    directory: Path | None = None,
) -> str:
    """The socket path of a broker endpoint.

    ``kind`` is ``"shared"`` (no name), ``"svc"`` or ``"inst"`` (name required,
    ``[a-z0-9-]{1,64}``): ``<dir>/rpb-v1-<userhash>-shared.sock``,
    ``...-svc-<name>.sock``, ``...-inst-<name>.sock``. ``directory`` defaults to
    ``runtime_dir(create=False)``. Raises ``EndpointNameError`` for an unknown kind,
    a bad or missing name, or a path longer than ``sun_path`` allows.
    """
    if kind not in _KINDS_WITH_NAME:
        raise EndpointNameError(
            f"unknown endpoint kind {kind!r}; expected one of {sorted(_KINDS_WITH_NAME)}"
        )
    if _KINDS_WITH_NAME[kind]:
        if name is None:
            raise EndpointNameError(f"endpoint kind {kind!r} requires a name")
        if not _NAME_PATTERN.fullmatch(name):
            raise EndpointNameError(
                f"endpoint name {name!r} is invalid: use 1 to 64 characters from [a-z0-9-]"
            )
        stem = f"{_ENDPOINT_PREFIX}-{user_hash()}-{kind}-{name}"
    else:
        if name is not None:
            raise EndpointNameError("the shared endpoint takes no name")
        stem = f"{_ENDPOINT_PREFIX}-{user_hash()}-shared"
    base = runtime_dir(create=False) if directory is None else directory
    path = os.path.join(os.fspath(base), f"{stem}.sock")
    check_sun_path(path)
    return path


def new_backend_endpoint(directory: Path | None = None) -> str:
    """A fresh, unguessable backend socket path: ``<dir>/rpb-v1-<userhash>-be-<32 hex>.sock``.

    The name carries 128 random bits; a path that already exists is never
    returned. Raises ``EndpointNameError`` when the directory is too long for
    ``sun_path``.
    """
    base = os.fspath(runtime_dir(create=False) if directory is None else directory)
    while True:
        suffix = secrets.token_bytes(_BACKEND_NAME_RANDOM_BYTES).hex()
        path = os.path.join(base, _backend_endpoint_name(suffix))
        check_sun_path(path)
        if not os.path.lexists(path):
            return path


def short_temp_dir() -> Path:
    """A base for temporary directories that will hold sockets: ``/tmp`` when present.

    The usual temporary directory can be too long for ``sun_path`` once a socket
    name is appended (macOS ``$TMPDIR`` is ``/var/folders/...``, pytest's
    ``tmp_path`` is deeper still), so ``/tmp`` wins wherever it exists; otherwise
    ``tempfile.gettempdir()``. Nothing is created.
    """
    if os.path.isdir("/tmp"):
        return Path("/tmp")
    return Path(tempfile.gettempdir())


def _backend_endpoint_name(random_hex: str) -> str:
    return f"{_ENDPOINT_PREFIX}-{user_hash()}-be-{random_hex}.sock"


def is_backend_endpoint_name(name: str) -> bool:
    """True when the file name ``name`` is a backend endpoint name of the current user."""
    match = _BACKEND_NAME_PATTERN.fullmatch(name)
    return match is not None and match.group("user") == user_hash()


def check_backend_endpoint_room(directory: os.PathLike[str] | str) -> None:
    """Raise ``RuntimeDirTooLongError`` unless backend endpoints in ``directory`` fit ``sun_path``.

    All backend endpoint names have the same length, so this is exact: when it
    passes, ``new_backend_endpoint(directory)`` never fails on length. Touches
    nothing on disk.
    """
    base = os.fspath(directory)
    probe = os.path.join(base, _backend_endpoint_name("0" * 2 * _BACKEND_NAME_RANDOM_BYTES))
    endpoint_bytes = len(os.fsencode(probe))
    if endpoint_bytes > SUN_PATH_MAX_BYTES:
        directory_bytes = len(os.fsencode(base))
        raise RuntimeDirTooLongError(
            base,
            directory_bytes=directory_bytes,
            endpoint_bytes=endpoint_bytes,
            limit_bytes=SUN_PATH_MAX_BYTES,
            max_directory_bytes=SUN_PATH_MAX_BYTES - (endpoint_bytes - directory_bytes),
        )


def mode_is_private(mode: int) -> bool:
    """True when permission bits ``mode`` grant nothing to group or others."""
    return mode & 0o077 == 0
