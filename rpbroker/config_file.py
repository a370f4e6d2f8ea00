"""Broker config files (TOML), and how their values combine with the command line.

What this module does: reads a broker config file whose keys are ``BrokerConfig``'s
field names, either at the top level or in one ``[broker]`` table; rejects unknown
keys with a did-you-mean; resolves relative paths against the file's directory;
and builds a ``BrokerConfig`` from the file's values overlaid with explicit
values from elsewhere (the CLI's flags), so precedence is those > the file >
``BrokerConfig``'s defaults. Values are structured with cattrs, strictly: a
number of seconds must be a TOML number, a switch a TOML boolean (``"false"`` is
not false). Every error names where the bad value came from: the file and its
field (``broker.toml: field 'drain_timeout_s': expected a positive number of
seconds (got -1)``), or the flag (``--drain-timeout: must be a positive number of
seconds (got -1)``).

What it does not do: define flags (the CLI does) or defaults and limits
(``BrokerConfig`` does), or watch the file: it is read once, with blocking I/O,
before the broker starts.
"""

from __future__ import annotations

import difflib
import enum
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError

from rpbroker.config import BrokerConfig, ConfigValueError
from rpbroker.errors import ConfigError

#: The optional table that holds the broker's keys (``[broker]``).
CONFIG_TABLE = "broker"

#: Fields holding file-system paths: relative values in a file are relative to the file.
PATH_FIELDS = frozenset({"services_dir", "runtime_dir", "socket_path"})


class ConfigFileError(ConfigError):
    """A broker config file cannot be read or holds a bad value; the message names both."""


class MissingConfigValue(ConfigError):
    """A required ``BrokerConfig`` field has no value from any source."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is required but was not set")
        self.field = field


@attrs.frozen
class ConfigFile:
    """A parsed config file: its path and its raw values by field name."""

    path: Path
    values: Mapping[str, Any]


@attrs.frozen
class Override:
    """A value for a field from outside the file, with the name to report it by."""

    origin: str
    value: Any


def field_names() -> tuple[str, ...]:
    """Every key a config file may hold: ``BrokerConfig``'s fields, in order."""
    return tuple(a.name for a in attrs.fields(BrokerConfig))


def read_config_file(path: os.PathLike[str] | str) -> ConfigFile:
    """Read a broker config file (blocking).

    Raises:
        ConfigFileError: unreadable, not TOML, unknown keys (with a did-you-mean),
            or a ``[broker]`` table next to top-level keys.
    """
    file = Path(path)
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"{file}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{file}: not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{file}: not valid TOML: {exc}") from None
    table = document.get(CONFIG_TABLE)
    if isinstance(table, dict):
        if len(document) > 1:
            others = ", ".join(sorted(k for k in document if k != CONFIG_TABLE))
            raise ConfigFileError(
                f"{file}: keys outside the [{CONFIG_TABLE}] table ({others}): put every key "
                f"in [{CONFIG_TABLE}] or none"
            )
        document = table
    unknown = [key for key in document if key not in field_names()]
    if unknown:
        raise ConfigFileError("\n".join(_unknown_key(file, key) for key in unknown))
    values = {
        key: _relative_to(file, value) if key in PATH_FIELDS else value
        for key, value in document.items()
    }
    return ConfigFile(path=file, values=values)


def build_config(file: ConfigFile | None, overrides: Mapping[str, Override]) -> BrokerConfig:
    """The ``BrokerConfig`` from ``overrides`` (by field name) over ``file`` over defaults.

    Every value is checked first, so all bad values are reported at once.

    Raises:
        ConfigFileError: a value from the file is of the wrong type or out of range.
        ConfigError: only overrides are; each line starts with the override's ``origin``.
        MissingConfigValue: a required field has no value anywhere.
    """
    raw: dict[str, Any] = dict(file.values) if file is not None else {}
    raw.update({name: override.value for name, override in overrides.items()})
    problems = [(name, expected) for name in raw if (expected := _check(name, raw[name]))]
    if problems:
        lines = []
        for name, expected in problems:
            if name in overrides:
                shown = _show(overrides[name].value)
                lines.append(f"{overrides[name].origin}: must be {expected} (got {shown})")
            else:
                assert file is not None  # only the file or an override gives a value
                lines.append(
                    f"{file.path}: field '{name}': expected {expected} (got {_show(raw[name])})"
                )
        error = ConfigError if all(name in overrides for name, _ in problems) else ConfigFileError
        raise error("\n".join(lines))
    try:
        return _CONVERTER.structure(raw, BrokerConfig)
    except ClassValidationError as group:
        for exc in group.exceptions:
            if isinstance(exc, KeyError):
                raise MissingConfigValue(_attribute_of(exc)) from None
        raise


def _check(name: str, value: Any) -> str | None:
    """What field ``name`` expects, if ``value`` is not acceptable for it; else ``None``."""
    field = _FIELDS[name]
    assert field.type is not None  # resolve_types gave every field its type
    try:
        typed = _CONVERTER.structure(value, field.type)
        if field.validator is not None:
            converted = field.converter(typed) if callable(field.converter) else typed
            field.validator(None, field, converted)
    except ConfigValueError as exc:
        return exc.expected
    except (_WrongType, cattrs.BaseValidationError):
        return _EXPECTED[name]
    return None


def _attribute_of(exc: Exception) -> str:
    for note in getattr(exc, "__notes__", []):
        if isinstance(note, AttributeValidationNote):
            return note.name
    raise exc  # pragma: no cover - cattrs names the attribute of every missing key


def _unknown_key(file: Path, key: str) -> str:
    guess = difflib.get_close_matches(key.replace("-", "_"), field_names(), n=1, cutoff=0.6)
    hint = (
        f"; did you mean '{guess[0]}'?" if guess else f"; the keys are {', '.join(field_names())}"
    )
    return f"{file}: unknown key '{key}'{hint}"


def _relative_to(file: Path, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    return os.path.join(os.path.dirname(os.path.abspath(file)), expanded)


def _show(value: Any) -> str:
    """A value as the operator wrote it: TOML-style strings and booleans, whole numbers bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# -- strict structuring -------------------------------------------------------------


class _WrongType(TypeError):
    pass


def _number(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _WrongType
    return float(value)


def _integer(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _WrongType
    return value


def _switch(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise _WrongType
    return value


def _text(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise _WrongType
    return value


def _path(value: Any, _: type) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise _WrongType
    return Path(value)


def _string_table(value: Any, _: type) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _WrongType
    return dict(value)


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _choice(value: Any, kind: type[enum.Enum]) -> enum.Enum:
    if not isinstance(value, str):
        raise _WrongType
    try:
        return kind(value)
    except ValueError:
        raise _WrongType from None


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(float, _number)
    converter.register_structure_hook(int, _integer)
    converter.register_structure_hook(bool, _switch)
    converter.register_structure_hook(str, _text)
    converter.register_structure_hook(Path, _path)
    converter.register_structure_hook_func(lambda kind: kind == dict[str, str], _string_table)
    converter.register_structure_hook_func(_is_enum, _choice)
    return converter


def _expected(field: attrs.Attribute[Any]) -> str:
    kind = field.type
    if kind is float:
        return "a positive number of seconds" if field.name.endswith("_s") else "a number"
    if kind is int:
        return "a positive integer"
    if kind is bool:
        return "true or false"
    if field.name in PATH_FIELDS:
        return "a path (a non-empty string)"
    if kind == dict[str, str]:
        return "a table of string values"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(f'"{member.value}"' for member in kind)
    return "a string"


_CONVERTER = _converter()
_FIELDS = attrs.fields_dict(attrs.resolve_types(BrokerConfig))
_EXPECTED = {name: _expected(field) for name, field in _FIELDS.items()}
