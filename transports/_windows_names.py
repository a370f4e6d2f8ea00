"""Names of rpbroker's named pipes on Windows.

What this module does: turns the current user's SID into the 16-hex user hash,
validates service/instance names, and builds the pipe paths of the broker
(``\\\\.\\pipe\\rpb-v1-<userhash>-shared`` / ``-svc-<name>`` / ``-inst-<name>``), of
backends (``-be-<32 hex>``) and of control channels (``-ctl-<32 hex>``), checking
the 256-character limit Windows puts on a pipe name. These are pure functions of
their arguments (plus ``secrets`` for the random parts).

What it does not do: ask Windows who the user is (``_windows_security`` does), or
create, open or check the existence of any pipe: a pipe name is claimed by
creating its first instance with ``FILE_FLAG_FIRST_PIPE_INSTANCE``
(``_windows_pipes``), which is what protects against squatting.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from transports._interface import EndpointNameError

#: Prefix of every local named pipe path.
PIPE_PREFIX = "\\\\.\\pipe\\"

#: The longest pipe path Windows accepts, prefix included (CreateNamedPipeW docs:
#: "The entire pipe name string can be up to 256 characters long").
PIPE_PATH_MAX_CHARS = 256

#: Prefix shared by every endpoint name (v1 naming, facts §5.1).
ENDPOINT_PREFIX = "rpb-v1"

#: Hex digits of the user hash (64 bits of sha256 of the SID string).
USER_HASH_HEX_CHARS = 16

#: Random bytes in backend and control pipe names (128 bits: unguessable).
RANDOM_NAME_BYTES = 16

#: Service and instance names: the alphabet of the Hello shape check.
_NAME_PATTERN = re.compile(r"[a-z0-9-]{1,64}")

#: A valid user hash.
_USER_HASH_PATTERN = re.compile(r"[0-9a-f]{16}")

#: Endpoint kinds accepted by ``broker_pipe_path`` and whether each takes a name
#: (the same spelling as the Unix transport).
KINDS_WITH_NAME = {"shared": False, "svc": True, "inst": True}


def user_hash_of(sid: str) -> str:
    """16 lowercase hex characters of sha256 of the SID string (UTF-8)."""
    return hashlib.sha256(sid.encode("utf-8")).hexdigest()[:USER_HASH_HEX_CHARS]


def check_user_hash(value: str) -> None:
    """Raise ``EndpointNameError`` unless ``value`` is 16 lowercase hex characters."""
    if not _USER_HASH_PATTERN.fullmatch(value):
        raise EndpointNameError(f"user hash {value!r} is not 16 lowercase hex characters")


def check_pipe_path(path: str) -> None:
    """Raise ``EndpointNameError`` unless ``path`` is a local pipe path Windows accepts.

    It must start with ``\\\\.\\pipe\\``, have a non-empty name with no further
    backslash (rpbroker never uses nested names), and be at most 256 characters.
    """
    if not path.startswith(PIPE_PREFIX):
        raise EndpointNameError(
            f"endpoint {path!r} is not a local named pipe path (it must start with {PIPE_PREFIX!r})"
        )
    name = path[len(PIPE_PREFIX) :]
    if not name or "\\" in name or "/" in name or "\x00" in name:
        raise EndpointNameError(f"endpoint {path!r} has an empty or nested pipe name")
    if len(path) > PIPE_PATH_MAX_CHARS:
        raise EndpointNameError(
            f"pipe path {path[:40]!r}... is {len(path)} characters; Windows allows "
            f"{PIPE_PATH_MAX_CHARS}"
        )


def _pipe_path(stem: str) -> str:
    path = PIPE_PREFIX + stem
    check_pipe_path(path)
    return path


def broker_pipe_path(user_hash: str, kind: str, name: str | None) -> str:
    """The pipe path of a broker endpoint.

    ``kind`` is ``"shared"`` (no name), ``"svc"`` or ``"inst"`` (name required,
    ``[a-z0-9-]{1,64}``). Raises ``EndpointNameError`` for an unknown kind, a bad or
    missing name, a name given to ``shared``, or a path over the limit.
    """
    check_user_hash(user_hash)
    if kind not in KINDS_WITH_NAME:
        raise EndpointNameError(
            f"unknown endpoint kind {kind!r}; expected one of {sorted(KINDS_WITH_NAME)}"
        )
    if not KINDS_WITH_NAME[kind]:
        if name is not None:
            raise EndpointNameError("the shared endpoint takes no name")
        return _pipe_path(f"{ENDPOINT_PREFIX}-{user_hash}-shared")
    if name is None:
        raise EndpointNameError(f"endpoint kind {kind!r} requires a name")
    if not _NAME_PATTERN.fullmatch(name):
        raise EndpointNameError(
            f"endpoint name {name[:80]!r} is invalid: use 1 to 64 characters from [a-z0-9-]"
        )
    return _pipe_path(f"{ENDPOINT_PREFIX}-{user_hash}-{kind}-{name}")


def random_pipe_path(user_hash: str, role: str) -> str:
    """``\\\\.\\pipe\\rpb-v1-<userhash>-<role>-<32 random hex>`` (role ``be`` or ``ctl``)."""
    check_user_hash(user_hash)
    if role not in ("be", "ctl"):
        raise EndpointNameError(f"unknown random pipe role {role!r}")
    suffix = secrets.token_bytes(RANDOM_NAME_BYTES).hex()
    return _pipe_path(f"{ENDPOINT_PREFIX}-{user_hash}-{role}-{suffix}")
