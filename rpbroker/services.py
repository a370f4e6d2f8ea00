"""Service definitions: load, validate and structure them from a services directory.

What this module does
---------------------
A *service definition* tells the broker how to start the backend for one service
name: its argv, its instance (private, shared or explicit), its version policy,
whether connections are handed off, its idle timeout and extra environment. They
live as one file per service in a *services directory*:

``<name>.toml``
    Human-edited TOML (stdlib :mod:`tomllib`), structured with a cattrs converter
    into an attrs class. Keys::

        service_name = "echo"                       # required; must equal <name>
        command = ["{python}", "{services_dir}/../echo_backend.py"]   # required argv
        handoff = true                              # default true
        min_version = "1.0.0"                       # optional semver
        version_allow_list = ["1.0.0", "1.1.0"]     # optional, exact matches
        isolation = "private"                       # "private" | "shared" | "explicit"
        explicit_instance = "ci-trusted"            # only (and required) with "explicit"
        idle_timeout_secs = 300                     # default 30, must be > 0
        env = { RUST_LOG = "info" }                 # extra environment, strings only

    A *foreign* backend (one that is not an rpbroker SDK process, e.g. a reference
    ``running_process_service.ServiceServer``) adds a ``[foreign]`` table::

        [foreign]
        endpoint = "{runtime_dir}/{service}-{token}.sock"   # required: path or template
        ready = "probe"                                     # "probe" (default) | "connect"
        ready_timeout_secs = 10                             # default: the broker's

    ``endpoint`` is where the backend listens: a fixed absolute path, or a template
    the broker fills for each incarnation from ``{runtime_dir}`` (the broker's runtime
    directory), ``{service}``, ``{version}`` and ``{token}`` (32 random hex digits).
    The backend learns it from ``{endpoint}`` in ``command`` (only allowed with
    ``[foreign]``) and from ``RPBROKER_BACKEND_ENDPOINT`` /
    ``RUNNING_PROCESS_BROKER_V1_BACKEND_PIPE``. A foreign backend has no control
    channel, so ``handoff`` must not be true (its connections always take the
    reconnect route). See :class:`ForeignBackend`.

    Unknown keys are an error. ``command[0]`` is an absolute path or a bare
    executable name that is resolved on ``PATH`` when the file is loaded; a relative
    path such as ``bin/echo`` is refused because its meaning would depend on the
    broker's working directory. Two placeholders may appear in any ``command``
    element and are substituted when the file is loaded: ``{python}`` (the Python
    interpreter running the broker, :data:`sys.executable`) and ``{services_dir}``
    (the absolute services directory). Write ``{{`` and ``}}`` for literal braces;
    any other ``{...}`` is an error.

``<name>.servicedef``
    The raw protobuf bytes of ``running_process.broker.v1.ServiceDefinition`` (no
    framing or header), as written by running-process tooling or
    :func:`write_servicedef`. ``binary_path`` becomes a one-element ``command``;
    ``labels`` are ignored; ``handoff`` is on and the idle timeout is the default.
    ``per_version_binary_dir`` is checked (absolute if set) but not carried.

When both files exist for a name, **the TOML file wins** and the ``.servicedef`` is
not read at all.

Every load re-checks the directory and the file, so an edit takes effect at the next
Hello. Validation order: the requested name must match ``[a-z0-9-]{1,64}`` before any
path is formed (so ``../x`` can never name a file); then the directory rule; then the
file rule; then the file is read, structured and validated; the name the file
declares must equal the name it was loaded as.

The security rules (stricter than the reference, which follows symbolic links and
ignores owners):

- *directory rule*: the services directory itself (``lstat``: a symbolic link is
  refused even if it points to a good directory) is a directory owned by the
  broker's user with no group or other permission bits (``transports.verify_private_dir``);
- *file rule*: a definition file is, before it is opened and again on the opened
  descriptor, a regular file (never a symbolic link, FIFO, device, socket or
  directory) owned by the broker's user with no group or other permission bits
  (``transports.read_private_file``); violations raise :class:`InsecureServiceFile`;
- *size rule*: at most :data:`MAX_DEFINITION_BYTES`.

Why reads are synchronous, and why that is enough: a definition is read on the
event loop, but only after the file rule proved it a regular file (a FIFO or device
is refused before any ``open``, and one swapped in later opens without waiting
because of ``O_NONBLOCK`` and is refused by ``fstat``), and never more than
:data:`MAX_DEFINITION_BYTES` of it. :class:`ServiceCatalog` reads only when the
file's ``lstat`` signature changed, so a steady Hello costs two ``lstat`` calls (the
directory's and the file's; three when a ``.servicedef`` is used). A worker thread
would not protect against a hung network file system anyway: the per-Hello
``lstat`` that makes edits apply at once would hang just the same; and under
trio's ``MockClock`` a thread lets the clock jump while it runs.

Git records neither directory modes nor the 0600 a definition needs: a checked-out
``examples/services`` is refused until it is ``chmod 700``-ed and its files ``chmod
600``-ed (or copied into a private directory, e.g. by
:func:`ensure_services_directory`).

On Windows owners and the group/other bits are not checked (POSIX modes do not
exist there and an ACL check is not implemented); links and non-regular files are
refused as on Unix.

What it does not do
-------------------
Spawn backends, watch the directory for changes, or check a whole directory at once
(:mod:`rpbroker.servicecheck` does, for start-up and ``rpbroker check``). Mapping a
load failure onto a wire refusal is offered by :func:`refusal_for`; deciding when to
load is the broker's.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

import transports
from rpbroker.errors import BrokerError
from rpbroker.policy.hello import is_valid_semver, is_valid_service_name
from rpbroker.wire.codes import BrokerIsolation, RefusalCode

if TYPE_CHECKING:
    from rpbroker.wire import ServiceDefinition

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_SECS",
    "ENDPOINT_TOKEN_HEX_DIGITS",
    "MAX_DEFINITION_BYTES",
    "ForeignBackend",
    "ForeignReady",
    "InsecureServiceDirectory",
    "InsecureServiceFile",
    "InvalidServiceName",
    "Isolation",
    "LoadFailure",
    "ServiceDefinitionError",
    "ServiceDirectoryError",
    "ServiceDirectoryMissing",
    "ServiceDirectoryUnusable",
    "ServiceCatalog",
    "ServiceLoadError",
    "ServiceNotFound",
    "ServiceSpec",
    "ensure_services_directory",
    "definition_entries",
    "list_services",
    "load_service",
    "refusal_for",
    "write_servicedef",
]

#: Idle timeout of a backend whose definition does not set one, seconds (SPEC §7).
DEFAULT_IDLE_TIMEOUT_SECS: Final[float] = 30.0

#: Largest definition file that is read, bytes. A definition is a few hundred bytes;
#: 64 KiB leaves room for long argv and env tables while bounding what one Hello can
#: make the event loop read and parse (about 10 ms of TOML parsing at this size;
#: 1 MiB would be about 160 ms).
MAX_DEFINITION_BYTES: Final[int] = 64 * 1024

TOML_SUFFIX: Final[str] = ".toml"
SERVICEDEF_SUFFIX: Final[str] = ".servicedef"

# ---------------------------------------------------------------------------
# Public values.
# ---------------------------------------------------------------------------


class Isolation(enum.Enum):
    """Which broker instance a service's backends belong to."""

    PRIVATE = "private"
    SHARED = "shared"
    EXPLICIT = "explicit"


_FROM_WIRE_ISOLATION: Final[Mapping[BrokerIsolation, Isolation]] = {
    BrokerIsolation.PRIVATE_BROKER: Isolation.PRIVATE,
    BrokerIsolation.SHARED_BROKER: Isolation.SHARED,
    BrokerIsolation.EXPLICIT_INSTANCE: Isolation.EXPLICIT,
}
_TO_WIRE_ISOLATION: Final[Mapping[Isolation, BrokerIsolation]] = {
    v: k for k, v in _FROM_WIRE_ISOLATION.items()
}


def _freeze_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


def _empty_env() -> Mapping[str, str]:
    return types.MappingProxyType({})


def _as_tuple(value: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(value)


#: Length of the ``{token}`` of a foreign endpoint template, hex digits (128 random
#: bits, as in the broker's own backend endpoint names: unguessable and unique).
ENDPOINT_TOKEN_HEX_DIGITS: Final[int] = 32

#: Placeholders of a ``[foreign]`` endpoint template, in the order messages list them.
_ENDPOINT_PLACEHOLDERS: Final[tuple[str, ...]] = ("runtime_dir", "service", "version", "token")


class ForeignReady(enum.Enum):
    """How the broker learns that a foreign backend is ready."""

    #: A v1 endpoint probe (0xB232) is answered with an identity that verifies.
    PROBE = "probe"
    #: The endpoint accepts a connection (for backends that do not answer the probe).
    CONNECT = "connect"


@attrs.frozen(kw_only=True)
class ForeignBackend:
    """The ``[foreign]`` table: a backend that is not an rpbroker SDK process.

    ``endpoint`` is the template as written (validated: known placeholders only,
    absolute once filled); :meth:`endpoint_for` fills it. ``ready_timeout_secs``
    ``None`` means the broker's ``spawn_ready_timeout_s``.
    """

    endpoint: str
    ready: ForeignReady = ForeignReady.PROBE
    ready_timeout_secs: float | None = None

    @property
    def per_incarnation(self) -> bool:
        """Whether every incarnation gets its own path (the template uses ``{token}``)."""
        return "token" in _placeholders_of(self.endpoint)

    def endpoint_for(self, runtime_dir: str, service: str, version: str, token: str) -> str:
        """The endpoint of one incarnation: the template filled with these values."""
        values = {"runtime_dir": runtime_dir, "service": service, "version": version}
        return _expand_placeholders(self.endpoint, {**values, "token": token})


@attrs.frozen(kw_only=True)
class ServiceSpec:
    """A validated service definition, as loaded from ``source``.

    ``command`` is the backend argv with placeholders substituted and a bare
    ``command[0]`` already resolved to an absolute path; use :meth:`argv` to get
    the argv of one incarnation. For a foreign service (``foreign`` set) the
    elements of ``command`` are still templates of the one placeholder
    ``{endpoint}`` (literal braces doubled), which :meth:`argv` fills. ``env`` is
    read-only and is left out of the hash (equality still compares it).
    """

    service_name: str
    command: tuple[str, ...] = attrs.field(converter=_as_tuple)
    handoff: bool = True
    min_version: str | None = None
    version_allow_list: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    isolation: Isolation = Isolation.PRIVATE
    explicit_instance: str | None = None
    idle_timeout_secs: float = DEFAULT_IDLE_TIMEOUT_SECS
    env: Mapping[str, str] = attrs.field(factory=_empty_env, converter=_freeze_env, hash=False)
    foreign: ForeignBackend | None = None
    source: Path

    def argv(self, endpoint: str) -> tuple[str, ...]:
        """The argv of an incarnation listening on ``endpoint`` (``{endpoint}`` filled)."""
        if self.foreign is None:
            return self.command
        return tuple(_expand_placeholders(arg, {"endpoint": endpoint}) for arg in self.command)

    @property
    def instance_id(self) -> str:
        """``"shared"``, ``"private:<service>"`` or ``"explicit:<instance>"``."""
        match self.isolation:
            case Isolation.SHARED:
                return "shared"
            case Isolation.PRIVATE:
                return f"private:{self.service_name}"
            case Isolation.EXPLICIT:
                return f"explicit:{self.explicit_instance}"


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


class LoadFailure(enum.Enum):
    """How the broker should treat a :class:`ServiceLoadError` (see :func:`refusal_for`)."""

    #: The requested name is not ``[a-z0-9-]{1,64}``: the peer sent something hostile.
    INVALID_NAME = "invalid-name"
    #: Neither ``<name>.toml`` nor ``<name>.servicedef`` exists.
    NOT_FOUND = "not-found"
    #: A definition (or the directory) exists but cannot be used.
    UNLOADABLE = "unloadable"


class ServiceLoadError(BrokerError):
    """Base of every failure of :func:`load_service`; ``path`` is the file or directory."""

    kind: ClassVar[LoadFailure] = LoadFailure.UNLOADABLE

    def __init__(self, path: Path | None, message: str) -> None:
        super().__init__(message)
        self.path = path


def _short_repr(s: str, limit: int = 80) -> str:
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class InvalidServiceName(ServiceLoadError):
    """The requested name is not ``[a-z0-9-]{1,64}``; no path was formed from it."""

    kind: ClassVar[LoadFailure] = LoadFailure.INVALID_NAME

    def __init__(self, name: str) -> None:
        super().__init__(
            None,
            f"invalid service name {_short_repr(name)}: use 1-64 characters from a-z, 0-9 and '-'",
        )
        self.name = name


class ServiceNotFound(ServiceLoadError):
    """Neither ``<name>.toml`` nor ``<name>.servicedef`` exists in ``directory``."""

    kind: ClassVar[LoadFailure] = LoadFailure.NOT_FOUND

    def __init__(self, directory: Path, name: str) -> None:
        super().__init__(
            directory,
            f"no definition for service '{name}' in {directory} "
            f"(looked for {name}{TOML_SUFFIX} and {name}{SERVICEDEF_SUFFIX})",
        )
        self.directory = directory
        self.name = name


class ServiceDefinitionError(ServiceLoadError):
    """A definition file is unreadable or invalid.

    ``field`` names the offending key (``None`` when the whole file is at fault, e.g.
    a TOML syntax error); ``message`` says what is wrong and what is expected.
    """

    path: Path

    def __init__(self, path: Path, field: str | None, message: str) -> None:
        where = f"field '{field}': " if field is not None else ""
        super().__init__(path, f"{path}: {where}{message}")
        self.field = field
        self.message = message


class ServiceDirectoryError(ServiceLoadError):
    """The services directory itself cannot be used; the message names the fix."""

    path: Path

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(path, message)


class ServiceDirectoryMissing(ServiceDirectoryError):
    """The services directory does not exist."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            path,
            f"services directory {path} does not exist; create it with 'mkdir -m 700 {path}'",
        )


class ServiceDirectoryUnusable(ServiceDirectoryError):
    """The services path exists but is not a directory, or cannot be examined."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, f"services directory {path} cannot be used: {reason}")
        self.reason = reason


class InsecureServiceDirectory(ServiceDirectoryError):
    """The services directory fails the directory rule (link, owner, group/other bits).

    ``problem`` says what is wrong, ``fix`` the command that repairs it.
    """

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        super().__init__(
            path,
            f"services directory {path} {problem}; definitions are only loaded from a "
            f"directory private to the broker's user: {fix}",
        )
        self.problem = problem
        self.fix = fix


class InsecureServiceFile(ServiceDefinitionError):
    """A definition file fails the file rule (not a regular file, owner, group/other bits).

    It is never opened (or, if it changed in between, never read).
    """

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        super().__init__(path, None, f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def refusal_for(error: ServiceLoadError) -> tuple[RefusalCode, str]:
    """The wire refusal (code, reason) a Hello gets when its service cannot be loaded."""
    match error.kind:
        case LoadFailure.INVALID_NAME:
            return RefusalCode.PEER_REJECTED, "invalid service_name"
        case LoadFailure.NOT_FOUND:
            return RefusalCode.SERVICE_UNKNOWN, "service definition was not found"
        case LoadFailure.UNLOADABLE:
            return (
                RefusalCode.SERVICE_UNKNOWN,
                f"service definition could not be loaded: {error}",
            )


# ---------------------------------------------------------------------------
# Directory.
# ---------------------------------------------------------------------------


def _absolute(directory: os.PathLike[str] | str) -> Path:
    return Path(os.path.abspath(directory))


def _check_directory(directory: Path | str) -> None:
    """Apply the directory rule (one ``lstat``); raise a :class:`ServiceDirectoryError`."""
    try:
        transports.verify_private_dir(directory)
    except transports.InsecurePathError as exc:
        raise _directory_error(Path(directory), exc) from None


def _directory_error(directory: Path, exc: transports.InsecurePathError) -> ServiceDirectoryError:
    """Say which of missing, unusable or insecure the refused ``directory`` is."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return ServiceDirectoryMissing(directory)
    except NotADirectoryError:
        return ServiceDirectoryUnusable(directory, "a parent is not a directory")
    except OSError as error:
        return ServiceDirectoryUnusable(directory, error.strerror or str(error))
    if stat.S_ISLNK(st.st_mode):
        return InsecureServiceDirectory(
            directory,
            "is a symbolic link (links are not followed)",
            f"use the directory itself ({os.path.realpath(directory)}) or replace the link with it",
        )
    if not stat.S_ISDIR(st.st_mode):
        return ServiceDirectoryUnusable(directory, "it is not a directory")
    return InsecureServiceDirectory(directory, exc.problem, exc.fix)


def ensure_services_directory(path: os.PathLike[str] | str) -> Path:
    """Create ``path`` (and parents) if needed and make it mode 0700; return it absolute.

    An existing directory is tightened to 0700 as well.
    """
    directory = _absolute(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


# ---------------------------------------------------------------------------
# TOML structuring.
# ---------------------------------------------------------------------------


@attrs.define
class _TomlForeign:
    """The exact shape of the ``[foreign]`` table."""

    endpoint: str
    ready: ForeignReady = ForeignReady.PROBE
    ready_timeout_secs: float | None = None


@attrs.define
class _TomlServiceFile:
    """The exact shape of a ``<name>.toml`` file (before semantic validation)."""

    service_name: str
    command: list[str]
    #: ``None``: not written (true, or false for a foreign backend).
    handoff: bool | None = None
    min_version: str | None = None
    version_allow_list: list[str] = attrs.Factory(list)
    isolation: Isolation = Isolation.PRIVATE
    explicit_instance: str | None = None
    idle_timeout_secs: float = DEFAULT_IDLE_TIMEOUT_SECS
    env: dict[str, str] = attrs.Factory(dict)
    foreign: _TomlForeign | None = None


_TOML_KEYS: Final[tuple[str, ...]] = tuple(a.name for a in attrs.fields(_TomlServiceFile))
_FOREIGN_KEYS: Final[tuple[str, ...]] = tuple(a.name for a in attrs.fields(_TomlForeign))


class _FieldProblem(Exception):
    """Raised by the strict structure hooks; its text is the user-facing message."""


def _toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise _FieldProblem(f"expected a string (got {_toml_type(value)})")
    return value


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise _FieldProblem(f"expected true or false (got {_toml_type(value)})")
    return value


def _structure_float(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _FieldProblem(f"expected a number (got {_toml_type(value)})")
    return float(value)


def _structure_str_list(value: object, _: object) -> list[str]:
    expected = "expected a list of strings"
    if not isinstance(value, list):
        raise _FieldProblem(f"{expected} (got {_toml_type(value)})")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldProblem(f"{expected} (item {index} is {_toml_type(item)})")
    return list(value)


def _structure_str_table(value: object, _: object) -> dict[str, str]:
    expected = "expected a table of string values"
    if not isinstance(value, dict):
        raise _FieldProblem(f"{expected} (got {_toml_type(value)})")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _FieldProblem(f"{expected} (value of {key!r} is {_toml_type(item)})")
    return dict(value)


def _structure_isolation(value: object, _: object) -> Isolation:
    choices = ", ".join(f"'{i.value}'" for i in Isolation)
    if not isinstance(value, str):
        raise _FieldProblem(f"expected one of {choices} (got {_toml_type(value)})")
    try:
        return Isolation(value)
    except ValueError:
        raise _FieldProblem(f"expected one of {choices} (got {value!r})") from None


def _structure_ready(value: object, _: object) -> ForeignReady:
    choices = ", ".join(f"'{r.value}'" for r in ForeignReady)
    if not isinstance(value, str):
        raise _FieldProblem(f"expected one of {choices} (got {_toml_type(value)})")
    try:
        return ForeignReady(value)
    except ValueError:
        raise _FieldProblem(f"expected one of {choices} (got {value!r})") from None


def _structure_foreign(value: object, _: object) -> _TomlForeign:
    if not isinstance(value, dict):
        raise _FieldProblem(
            f"expected a table (got {_toml_type(value)}): write it as a [foreign] section"
        )
    return _structure_foreign_table(value, _TomlForeign)


def _is_type(expected: object) -> Callable[[Any], bool]:
    return lambda t: bool(t == expected)


def _make_converter() -> cattrs.Converter:
    """A converter that never coerces: every TOML value must already have the right type."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(Isolation, _structure_isolation)
    converter.register_structure_hook_func(_is_type(list[str]), _structure_str_list)
    converter.register_structure_hook_func(_is_type(dict[str, str]), _structure_str_table)
    converter.register_structure_hook(ForeignReady, _structure_ready)
    return converter


_CONVERTER: Final = _make_converter()
#: Structures the ``[foreign]`` table (unknown keys refused, like the file's own).
_structure_foreign_table: Final = cattrs.gen.make_dict_structure_fn(_TomlForeign, _CONVERTER)
_CONVERTER.register_structure_hook(_TomlForeign, _structure_foreign)


def _structure_problems(
    error: ClassValidationError, keys: tuple[str, ...], prefix: str
) -> list[tuple[str, str]]:
    """(field, message) for every problem in cattrs' exception group, fields in ``keys`` order.

    A nested table's problems (``[foreign]``) are named ``<table>.<key>``.
    """
    problems: list[tuple[str, str]] = []
    nested: list[tuple[str, str]] = []
    with_notes, without_notes = error.group_exceptions()
    for exc, note in with_notes:
        if isinstance(exc, ClassValidationError) and note.name == "foreign":
            nested.extend(_structure_problems(exc, _FOREIGN_KEYS, f"{prefix}foreign."))
            continue
        if isinstance(exc, KeyError):
            message = "required key is missing"
        elif isinstance(exc, _FieldProblem):
            message = str(exc)
        else:  # pragma: no cover - the strict hooks above raise _FieldProblem
            message = f"invalid value ({exc})"
        problems.append((f"{prefix}{note.name}", message))
    problems.extend(nested)

    def order(problem: tuple[str, str]) -> int:
        name = problem[0].removeprefix(prefix).split(".")[0]
        return keys.index(name) if name in keys else len(keys)

    problems.sort(key=order)
    allowed = ", ".join(keys)
    for exc in without_notes:
        if isinstance(exc, ForbiddenExtraKeysError):
            for key in sorted(exc.extra_fields):
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append((f"{prefix}{key}", f"unknown key ({hint}allowed keys: {allowed})"))
        else:  # pragma: no cover - defensive
            problems.append(("?", str(exc)))
    return problems


def _describe_structure_errors(path: Path, error: ClassValidationError) -> ServiceDefinitionError:
    """Fold cattrs' exception group into one error naming the file and the field(s)."""
    problems = _structure_problems(error, _TOML_KEYS, "")
    field, message = problems[0]
    if len(problems) > 1:
        others = "; ".join(f"field '{f}': {m}" for f, m in problems[1:])
        message = f"{message}; also {others}"
    return ServiceDefinitionError(path, field, message)


# ---------------------------------------------------------------------------
# Placeholders and semantic validation (shared by both formats).
# ---------------------------------------------------------------------------

_PLACEHOLDER_RE: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _expand_placeholders(
    arg: str, values: Mapping[str, str], keep: frozenset[str] = frozenset()
) -> str:
    """Substitute ``{name}`` from ``values``; ``{{``/``}}`` are literal braces.

    Placeholders named in ``keep`` are left in place, and then literal braces stay
    doubled: the result is still a template of the kept names.
    """

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token if keep else token[0]
        name = match.group(1)
        if name is None:
            raise _FieldProblem(
                f"unmatched '{token}' in {arg!r} (write '{{{{' or '}}}}' for a literal brace)"
            )
        if name in keep:
            return token
        if name not in values:
            known = ", ".join(f"{{{k}}}" for k in (*values, *sorted(keep)))
            hint = (
                "; {endpoint} is only known for a foreign backend: add a [foreign] table"
                if name == "endpoint"
                else ""
            )
            raise _FieldProblem(
                f"unknown placeholder '{{{name}}}' in {arg!r} (known: {known}; "
                f"write '{{{{' or '}}}}' for a literal brace){hint}"
            )
        return values[name]

    return _PLACEHOLDER_RE.sub(replace, arg)


def _placeholders_of(template: str) -> set[str]:
    """The placeholder names a (valid) template uses."""
    return {m.group(1) for m in _PLACEHOLDER_RE.finditer(template) if m.group(1) is not None}


def _check_foreign(
    raw: _TomlForeign, fail: Callable[[str, str], ServiceDefinitionError]
) -> ForeignBackend:
    """Validate the ``[foreign]`` table; ``fail`` builds the error naming the key."""
    template = raw.endpoint
    if not template:
        raise fail(
            "foreign.endpoint",
            "must not be empty: give an absolute socket path or a template "
            'such as "{runtime_dir}/{service}-{token}.sock"',
        )
    if "\0" in template:
        raise fail("foreign.endpoint", "must not contain a NUL character")
    sample = {name: name for name in _ENDPOINT_PLACEHOLDERS}
    sample["runtime_dir"] = os.path.abspath(os.sep + "runtime")
    try:
        filled = _expand_placeholders(template, sample)
    except _FieldProblem as exc:
        raise fail("foreign.endpoint", str(exc)) from None
    if not os.path.isabs(filled):
        raise fail(
            "foreign.endpoint",
            f"{_short_repr(template)} is not an absolute path: start it with '/' "
            "(a fixed path) or with {runtime_dir}",
        )
    timeout = raw.ready_timeout_secs
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise fail(
            "foreign.ready_timeout_secs",
            f"must be a finite number of seconds greater than 0 (got {timeout!r})",
        )
    return ForeignBackend(endpoint=template, ready=raw.ready, ready_timeout_secs=timeout)


def _resolve_command(command: tuple[str, ...]) -> tuple[str, ...]:
    """Check the argv shape and resolve a bare ``command[0]`` on PATH."""
    if not command:
        raise _FieldProblem("must be a non-empty list: the executable followed by its arguments")
    for index, arg in enumerate(command):
        if not arg:
            raise _FieldProblem(f"command[{index}] must not be empty")
        if "\0" in arg:
            raise _FieldProblem(f"command[{index}] must not contain a NUL character")
    program = command[0]
    if os.path.isabs(program):
        return command
    if "/" in program or "\\" in program:
        raise _FieldProblem(
            f"command[0] {program!r} is a relative path; use an absolute path "
            "or a bare executable name found on PATH"
        )
    found = shutil.which(program)
    if found is None:
        raise _FieldProblem(
            f"command[0] {program!r} was not found on PATH; install it or use an absolute path"
        )
    return (os.path.abspath(found), *command[1:])


def _check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise _FieldProblem(
                f"environment variable name {key!r} must be non-empty "
                "and contain neither '=' nor NUL"
            )
        if "\0" in value:
            raise _FieldProblem(f"value of {key!r} must not contain a NUL character")


@attrs.frozen(kw_only=True)
class _Candidate:
    """Fields of either format, before semantic validation."""

    service_name: str
    command: tuple[str, ...]
    handoff: bool
    min_version: str | None
    version_allow_list: tuple[str, ...]
    isolation: Isolation
    explicit_instance: str | None
    idle_timeout_secs: float
    env: Mapping[str, str]
    foreign: ForeignBackend | None = None


def _validate(source: Path, requested: str, c: _Candidate) -> ServiceSpec:
    """Apply the rules of facts §10 (plus argv/env/timeout rules) and build the spec."""

    def fail(field: str, message: str) -> ServiceDefinitionError:
        return ServiceDefinitionError(source, field, message)

    if c.service_name != requested:
        raise fail(
            "service_name",
            f"file declares {_short_repr(c.service_name)} but was loaded as '{requested}': "
            f'set service_name = "{requested}" or rename the file',
        )
    if c.min_version is not None and not is_valid_semver(c.min_version):
        raise fail(
            "min_version",
            f"{_short_repr(c.min_version)} is not a version like 1.2.3 or 1.2.3-rc.1",
        )
    for index, version in enumerate(c.version_allow_list):
        if not is_valid_semver(version):
            raise fail(
                "version_allow_list",
                f"item {index} {_short_repr(version)} is not a version like 1.2.3 or 1.2.3-rc.1",
            )
    explicit_instance = c.explicit_instance or None
    if c.isolation is Isolation.EXPLICIT:
        if explicit_instance is None:
            raise fail(
                "explicit_instance", "isolation 'explicit' requires an explicit_instance name"
            )
        if not is_valid_service_name(explicit_instance):
            raise fail(
                "explicit_instance",
                f"{_short_repr(explicit_instance)} is not valid: "
                "use 1-64 characters from a-z, 0-9 and '-'",
            )
    elif explicit_instance is not None:
        raise fail(
            "explicit_instance",
            f"explicit_instance must be empty unless isolation is 'explicit' "
            f"(isolation is '{c.isolation.value}')",
        )
    try:
        command = _resolve_command(c.command)
    except _FieldProblem as exc:
        raise fail("command", str(exc)) from None
    if not (math.isfinite(c.idle_timeout_secs) and c.idle_timeout_secs > 0):
        raise fail(
            "idle_timeout_secs",
            f"must be a finite number of seconds greater than 0 (got {c.idle_timeout_secs!r})",
        )
    try:
        _check_env(c.env)
    except _FieldProblem as exc:
        raise fail("env", str(exc)) from None
    return ServiceSpec(
        service_name=c.service_name,
        command=command,
        handoff=c.handoff,
        min_version=c.min_version,
        version_allow_list=c.version_allow_list,
        isolation=c.isolation,
        explicit_instance=explicit_instance,
        idle_timeout_secs=c.idle_timeout_secs,
        env=c.env,
        foreign=c.foreign,
        source=source,
    )


# ---------------------------------------------------------------------------
# The two formats.
# ---------------------------------------------------------------------------


def _load_toml(path: Path, data: bytes, requested: str, directory: Path) -> ServiceSpec:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceDefinitionError(
            path, None, f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "(at line N, column M)", or "(at end of document)" instead.
        detail = str(exc)
        if "at line" not in detail:
            detail = f"{detail} (the file ends at line {max(1, len(text.splitlines()))})"
        raise ServiceDefinitionError(path, None, f"invalid TOML: {detail}") from None
    try:
        raw = _CONVERTER.structure(document, _TomlServiceFile)
    except ClassValidationError as exc:
        raise _describe_structure_errors(path, exc) from None
    placeholders = {"python": sys.executable, "services_dir": str(directory)}
    # A foreign backend's argv keeps {endpoint}: it is filled per incarnation.
    keep = frozenset({"endpoint"}) if raw.foreign is not None else frozenset()
    try:
        command = tuple(_expand_placeholders(arg, placeholders, keep) for arg in raw.command)
    except _FieldProblem as exc:
        raise ServiceDefinitionError(path, "command", str(exc)) from None
    if command and "{endpoint}" in command[0]:
        raise ServiceDefinitionError(
            path,
            "command",
            "command[0] must name the program, not contain {endpoint}: "
            "pass the endpoint as an argument",
        )

    def fail(field: str, message: str) -> ServiceDefinitionError:
        return ServiceDefinitionError(path, field, message)

    foreign = None if raw.foreign is None else _check_foreign(raw.foreign, fail)
    if foreign is not None and raw.handoff:
        raise fail(
            "handoff",
            "a foreign backend has no control channel, so connections cannot be "
            "handed to it: remove 'handoff' (its clients always reconnect)",
        )
    return _validate(
        path,
        requested,
        _Candidate(
            service_name=raw.service_name,
            command=command,
            handoff=foreign is None and raw.handoff is not False,
            min_version=raw.min_version,
            version_allow_list=tuple(raw.version_allow_list),
            isolation=raw.isolation,
            explicit_instance=raw.explicit_instance,
            idle_timeout_secs=raw.idle_timeout_secs,
            env=raw.env,
            foreign=foreign,
        ),
    )


def _spec_from_servicedef(path: Path, definition: ServiceDefinition, requested: str) -> ServiceSpec:
    binary_path = definition.binary_path
    if not binary_path:
        raise ServiceDefinitionError(path, "binary_path", "must not be empty")
    if not os.path.isabs(binary_path):
        raise ServiceDefinitionError(
            path, "binary_path", f"{_short_repr(binary_path)} must be absolute"
        )
    per_version_dir = definition.per_version_binary_dir
    if per_version_dir and not os.path.isabs(per_version_dir):
        raise ServiceDefinitionError(
            path, "per_version_binary_dir", f"{_short_repr(per_version_dir)} must be absolute"
        )
    try:
        isolation = _FROM_WIRE_ISOLATION[BrokerIsolation(definition.isolation)]
    except ValueError:
        raise ServiceDefinitionError(
            path, "isolation", f"unknown BrokerIsolation value {int(definition.isolation)}"
        ) from None
    return _validate(
        path,
        requested,
        _Candidate(
            service_name=definition.service_name,
            command=(binary_path,),
            handoff=True,
            min_version=definition.min_version or None,
            version_allow_list=tuple(definition.version_allow_list),
            isolation=isolation,
            explicit_instance=definition.explicit_instance or None,
            idle_timeout_secs=DEFAULT_IDLE_TIMEOUT_SECS,
            env={},
        ),
    )


def _load_servicedef(path: Path, data: bytes, requested: str) -> ServiceSpec:
    from google.protobuf.message import DecodeError

    from rpbroker.wire import ServiceDefinition

    definition = ServiceDefinition()
    try:
        definition.ParseFromString(data)
    except DecodeError as exc:
        raise ServiceDefinitionError(
            path, None, f"not a valid ServiceDefinition protobuf ({exc})"
        ) from None
    return _spec_from_servicedef(path, definition, requested)


def _read(path: Path) -> bytes | None:
    """The file's bytes under the file and size rules, or ``None`` when it does not exist."""
    try:
        data = transports.read_private_file(os.fspath(path), MAX_DEFINITION_BYTES)
    except transports.InsecurePathError as exc:
        raise InsecureServiceFile(path, exc.problem, exc.fix) from None
    except OSError as exc:
        raise ServiceDefinitionError(path, None, f"cannot be read: {exc.strerror or exc}") from exc
    if data is not None and len(data) > MAX_DEFINITION_BYTES:
        raise ServiceDefinitionError(
            path,
            None,
            f"is larger than {MAX_DEFINITION_BYTES} bytes, the limit for a definition "
            "(a definition is a few hundred bytes): shorten it",
        )
    return data


def _load_file(path: Path, requested: str, directory: Path) -> ServiceSpec | None:
    """Read and validate the definition at ``path``; ``None`` when it does not exist."""
    data = _read(path)
    if data is None:
        return None
    if path.suffix == TOML_SUFFIX:
        return _load_toml(path, data, requested, directory)
    return _load_servicedef(path, data, requested)


def _candidates(directory: Path, name: str) -> tuple[Path, Path]:
    """The definition paths of ``name`` in the order they are tried (TOML wins)."""
    return directory / f"{name}{TOML_SUFFIX}", directory / f"{name}{SERVICEDEF_SUFFIX}"


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------


def load_service(directory: os.PathLike[str] | str, name: str) -> ServiceSpec:
    """Load and validate the definition of ``name`` from ``directory``, from disk, now.

    Raises :class:`InvalidServiceName` before touching the filesystem when ``name`` is
    not ``[a-z0-9-]{1,64}``; :class:`ServiceDirectoryError` subclasses for a missing,
    unusable or insecure directory; :class:`ServiceNotFound` when neither file exists;
    :class:`ServiceDefinitionError` for an unreadable or invalid file.
    """
    if not is_valid_service_name(name):
        raise InvalidServiceName(name)
    root = _absolute(directory)
    _check_directory(root)
    for path in _candidates(root, name):
        spec = _load_file(path, name, root)
        if spec is not None:
            return spec
    raise ServiceNotFound(root, name)


@attrs.frozen
class _Verified:
    """A definition that passed every rule, and the ``lstat`` signature it had.

    ``first_choice`` is the path as text when it is the definition tried first
    (the TOML file): then nothing else can take precedence over it, and one
    ``lstat`` of it tells whether it still holds.
    """

    path: Path
    signature: tuple[int, ...]
    spec: ServiceSpec
    first_choice: str | None


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever the file's bytes, type, owner or mode change (ctime covers all)."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ServiceCatalog:
    """``load_service`` for a broker: checked on every call, read only when changed.

    Every ``load`` applies the directory rule and ``lstat``s the definition file, so
    an edit, a replacement, a removal, a ``chmod``/``chown`` or a symbolic link put
    in its place is seen by the very next Hello, exactly as with ``load_service``.
    Only when the file's ``lstat`` signature (device, inode, type and mode, owner,
    size, modification and change times in ns) is the one it had when it last passed
    every rule is the validated spec reused instead of reading the file again.
    Failures are never cached.
    """

    def __init__(self, directory: os.PathLike[str] | str) -> None:
        self._root = _absolute(directory)
        self._root_text = os.fspath(self._root)
        self._verified: dict[str, _Verified] = {}

    @property
    def directory(self) -> Path:
        return self._root

    def load(self, name: str) -> ServiceSpec:
        """The spec of ``name``: ``lstat`` calls only when unchanged, a bounded read otherwise.

        Raises what :func:`load_service` raises.
        """
        verified = self._verified.get(name)  # only valid names are ever verified
        if verified is None and not is_valid_service_name(name):
            raise InvalidServiceName(name)
        _check_directory(self._root_text)
        if verified is not None and verified.first_choice is not None:
            # The hot path (every Hello for a known service): the same lstat as
            # below, without building paths.
            with contextlib.suppress(OSError):  # gone or unreadable: the full path says which
                if _signature(os.lstat(verified.first_choice)) == verified.signature:
                    return verified.spec
        for position, path in enumerate(_candidates(self._root, name)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ServiceDefinitionError(
                    path, None, f"cannot be examined: {exc.strerror or exc}"
                ) from exc
            signature = _signature(st)
            verified = self._verified.get(name)
            if verified is not None and (verified.path, verified.signature) == (path, signature):
                return verified.spec
            self._verified.pop(name, None)
            spec = _load_file(path, name, self._root)
            if spec is None:
                continue  # removed since the lstat
            first_choice = os.fspath(path) if position == 0 else None
            self._verified[name] = _Verified(path, signature, spec, first_choice)
            return spec
        self._verified.pop(name, None)
        raise ServiceNotFound(self._root, name)


def list_services(directory: os.PathLike[str] | str) -> list[str]:
    """Sorted names that have a ``<name>.toml`` or ``<name>.servicedef`` regular file.

    Only the entries are looked at, without following links (the files are not
    validated); the directory rule applies as for :func:`load_service`.
    """
    return sorted(
        name
        for name, is_regular in definition_entries(directory).items()
        if is_valid_service_name(name) and is_regular
    )


def definition_entries(directory: os.PathLike[str] | str) -> dict[str, bool]:
    """Every stem of a ``*.toml``/``*.servicedef`` entry, valid name or not.

    Maps each stem to whether one of its entries is a regular file (``lstat``). The
    directory rule applies as for :func:`load_service`.
    """
    root = _absolute(directory)
    _check_directory(root)
    found: dict[str, bool] = {}
    with os.scandir(root) as entries:
        for entry in entries:
            for suffix in (TOML_SUFFIX, SERVICEDEF_SUFFIX):
                stem = entry.name.removesuffix(suffix)
                if stem != entry.name and stem:
                    regular = entry.is_file(follow_symlinks=False)
                    found[stem] = found.get(stem, False) or regular
    return found


def _to_servicedef(spec: ServiceSpec) -> ServiceDefinition:
    from rpbroker.wire import ServiceDefinition
    from rpbroker.wire._pb.broker_v1_pb2 import BrokerIsolation as WireIsolation

    lost: list[str] = []
    if len(spec.command) != 1:
        lost.append("command arguments")
    if not spec.handoff:
        lost.append("handoff = false")
    if spec.idle_timeout_secs != DEFAULT_IDLE_TIMEOUT_SECS:
        lost.append("idle_timeout_secs")
    if spec.env:
        lost.append("env")
    if spec.foreign is not None:
        lost.append("a [foreign] table")
    if lost:
        raise ValueError(
            f"service '{spec.service_name}' cannot be written as a .servicedef: "
            f"the format has no place for {', '.join(lost)}"
        )
    return ServiceDefinition(
        service_name=spec.service_name,
        binary_path=spec.command[0],
        isolation=WireIsolation.ValueType(_TO_WIRE_ISOLATION[spec.isolation]),
        explicit_instance=spec.explicit_instance or "",
        min_version=spec.min_version or "",
        version_allow_list=list(spec.version_allow_list),
    )


def write_servicedef(
    directory: os.PathLike[str] | str, spec_or_proto: ServiceSpec | ServiceDefinition
) -> Path:
    """Validate a definition and write it as ``<directory>/<name>.servicedef``.

    The directory is created (0700) if needed; the file is replaced atomically and
    is mode 0600. A :class:`ServiceSpec` must fit the format (one-element command,
    handoff on, default idle timeout, no env) or ``ValueError`` is raised. Returns the
    path written.
    """
    definition = (
        _to_servicedef(spec_or_proto) if isinstance(spec_or_proto, ServiceSpec) else spec_or_proto
    )
    name = definition.service_name
    if not is_valid_service_name(name):
        raise InvalidServiceName(name)
    root = ensure_services_directory(directory)
    path = root / f"{name}{SERVICEDEF_SUFFIX}"
    _spec_from_servicedef(path, definition, name)
    data = definition.SerializeToString()
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
