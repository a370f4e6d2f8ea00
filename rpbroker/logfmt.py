"""Log lines for operators: ``key=value`` text, or one JSON object per line.

What this module does: ``KeyValues`` is a log message made of typed fields
(``logger.info(KeyValues.of(msg="listening", socket=path))``); its ``str`` is
``key=value`` text, so any formatter shows it readably. ``KeyValueFormatter``
writes every record as one logfmt line (``ts=... level=info logger=... msg=...``
followed by the fields), ``JsonFormatter`` as one JSON object with the fields as
typed members. ``configure_logging`` installs one of them on the root logger,
writing to stderr; ``rpbroker serve``, ``run_backend`` and the examples use it.

What it does not do: decide what is logged or at which level (the modules that
log do), rotate or ship logs (journald, supervisord or the operator's collector
does), or filter fields.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import attrs

from rpbroker.errors import ConfigError

#: Environment variables naming the level and format of a process's log lines. ``rpbroker
#: serve`` reads them as defaults for its flags and passes its choice on to backends.
ENV_LOG_LEVEL = "RPBROKER_LOG_LEVEL"
ENV_LOG_FORMAT = "RPBROKER_LOG_FORMAT"

T = TypeVar("T")

#: A field's value: what ``key=value`` text and JSON can both show as a typed value.
FieldValue = str | int | float | bool | None | list[object] | dict[str, object]

#: Keys every line starts with; a field of the same name is written as ``field.<key>``.
_FIXED_KEYS = frozenset({"ts", "level", "logger"})


class LogFormat(enum.Enum):
    """How log lines are written."""

    TEXT = "text"
    JSON = "json"


@attrs.frozen
class KeyValues:
    """A log message made of named, typed fields, in order.

    Fields whose value is ``None`` or an empty string are left out of the line,
    so callers can pass optional values as they are.
    """

    fields: tuple[tuple[str, FieldValue], ...]

    @classmethod
    def of(cls, **fields: FieldValue) -> KeyValues:
        return cls(tuple(fields.items()))

    @classmethod
    def from_mapping(cls, fields: Mapping[str, FieldValue]) -> KeyValues:
        return cls(tuple(fields.items()))

    def present(self) -> list[tuple[str, FieldValue]]:
        """The fields that are written (``None`` and ``""`` are skipped)."""
        return [(k, v) for k, v in self.fields if v is not None and v != ""]

    def __str__(self) -> str:
        return text_pairs(self.present())


def text_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    """``key=value`` pairs joined by spaces; a mapping value becomes ``key.sub=value`` pairs."""
    return " ".join(f"{key}={text_value(value)}" for key, value in _flatten(pairs))


def _flatten(pairs: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    for key, value in pairs:
        if isinstance(value, Mapping) and value:
            yield from _flatten((f"{key}.{sub}", inner) for sub, inner in value.items())
        else:
            yield key, value


def text_value(value: object) -> str:
    """``value`` as logfmt text: bare when it is one plain word, quoted otherwise.

    Booleans are ``true``/``false``; lists (and mappings inside them) are compact JSON; strings
    with spaces, quotes, ``=`` or control characters are double-quoted with JSON
    escapes, so every record stays on one line.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else json.dumps(str(value))
    if isinstance(value, list | tuple | dict):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    else:
        text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record_fields(record: logging.LogRecord) -> list[tuple[str, FieldValue]]:
    """The record's own fields: a ``KeyValues`` message's, or ``msg`` with the text."""
    if isinstance(record.msg, KeyValues) and not record.args:
        fields = record.msg.present()
    else:
        fields = [("msg", record.getMessage())]
    if record.exc_info:
        fields.append(("exc", logging.Formatter().formatException(record.exc_info)))
    elif record.exc_text:
        fields.append(("exc", record.exc_text))
    if record.stack_info:
        fields.append(("stack", record.stack_info))
    return [(f"field.{k}" if k in _FIXED_KEYS else k, v) for k, v in fields]


class _FieldsFormatter(logging.Formatter):
    """Base of both formats: ``static`` fields (for example which backend wrote the
    line) follow ``ts``, ``level`` and ``logger`` on every line."""

    def __init__(self, static: Mapping[str, FieldValue] | None = None) -> None:
        super().__init__()
        self._static = KeyValues.from_mapping(static or {}).present()


class KeyValueFormatter(_FieldsFormatter):
    """One logfmt line per record: ``ts=... level=... logger=... <fields>``."""

    def format(self, record: logging.LogRecord) -> str:
        head: list[tuple[str, FieldValue]] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
        ]
        return text_pairs(head + self._static + _record_fields(record))


class JsonFormatter(_FieldsFormatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, then the fields, typed."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        body.update(self._static)
        body.update(_record_fields(record))
        return json.dumps(body, ensure_ascii=False, default=str)


def formatter(fmt: LogFormat, static: Mapping[str, FieldValue] | None = None) -> logging.Formatter:
    """The formatter for ``fmt``."""
    if fmt is LogFormat.JSON:
        return JsonFormatter(static)
    return KeyValueFormatter(static)


def parse_level(text: str) -> int:
    """A ``logging`` level from its name in any case (``"debug"``, ``"INFO"``).

    Raises:
        ValueError: no such level; the message lists the names.
    """
    name = text.strip().lower()
    if name not in LEVEL_NAMES:
        raise ValueError(f"expected one of {', '.join(LEVEL_NAMES)} (got {text!r})")
    return logging.getLevelNamesMapping()[name.upper()]


def parse_format(text: str) -> LogFormat:
    """A ``LogFormat`` from its name in any case.

    Raises:
        ValueError: no such format; the message lists the names.
    """
    try:
        return LogFormat(text.strip().lower())
    except ValueError:
        names = ", ".join(f.value for f in LogFormat)
        raise ValueError(f"expected one of {names} (got {text!r})") from None


#: Level names accepted by ``parse_level`` (any case).
LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")


def env_log_level(environ: Mapping[str, str], default: int) -> int:
    """The level named by ``$RPBROKER_LOG_LEVEL``, or ``default`` when it is unset.

    Raises:
        ConfigError: an unknown name; the message names the variable.
    """
    return _from_env(environ, ENV_LOG_LEVEL, parse_level, default)


def env_log_format(environ: Mapping[str, str]) -> LogFormat:
    """The format named by ``$RPBROKER_LOG_FORMAT``, or text when it is unset.

    Raises:
        ConfigError: an unknown name; the message names the variable.
    """
    return _from_env(environ, ENV_LOG_FORMAT, parse_format, LogFormat.TEXT)


def _from_env(environ: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"${name}: {exc}") from None


def configure_logging_from_env(
    default_level: int, *, static: Mapping[str, FieldValue] | None = None
) -> logging.Handler:
    """``configure_logging`` with ``$RPBROKER_LOG_LEVEL`` and ``$RPBROKER_LOG_FORMAT``.

    Raises:
        ConfigError: a variable holds an unknown value; the message names it.
    """
    level = env_log_level(os.environ, default_level)
    return configure_logging(level, env_log_format(os.environ), static=static)


def configure_logging(
    level: int | str,
    fmt: LogFormat = LogFormat.TEXT,
    *,
    static: Mapping[str, FieldValue] | None = None,
) -> logging.Handler:
    """Send every log record to stderr in ``fmt``, at ``level`` and above.

    Replaces the root logger's handlers (a second call reconfigures rather than
    doubling lines) and returns the installed handler. ``level`` is a ``logging``
    level or its name in any case (``"debug"``, ``"INFO"``).

    Raises:
        ValueError: ``level`` is not a level name ``logging`` knows.
    """
    if isinstance(level, str):
        resolved = logging.getLevelNamesMapping().get(level.upper())
        if resolved is None:
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, static))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
