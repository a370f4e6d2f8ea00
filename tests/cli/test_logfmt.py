"""``rpbroker.logfmt``: key=value and JSON lines, and lifecycle events logged through them."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from rpbroker.events import EventKind, EventLog
from rpbroker.logfmt import (
    JsonFormatter,
    KeyValueFormatter,
    KeyValues,
    LogFormat,
    parse_format,
    parse_level,
    text_value,
)

from .support import parse_logfmt


def record(msg: object, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("rpbroker.test", logging.WARNING, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("/tmp/x.sock", "/tmp/x.sock"),
        (True, "true"),
        (-9, "-9"),
        (0.25, "0.25"),
        ([1, "a"], '"[1,\\"a\\"]"'),
        ([], "[]"),
    ],
)
def test_text_values(value: object, text: str) -> None:
    assert text_value(value) == text


def test_key_values_skip_empty_fields_and_flatten_tables() -> None:
    message = KeyValues.of(
        event="broadcast-result", service="", pid=None, op={"kind": "quiesce", "n": 2}, ok=False
    )
    assert str(message) == "event=broadcast-result op.kind=quiesce op.n=2 ok=false"


def test_text_formatter_writes_one_parsable_line() -> None:
    line = KeyValueFormatter().format(record("connection %s ended: %s", 3, "reset by peer"))
    pairs = parse_logfmt(line)
    assert pairs["level"] == "warning" and pairs["logger"] == "rpbroker.test"
    assert pairs["msg"] == "connection 3 ended: reset by peer"
    assert pairs["ts"].endswith("Z")
    failed = KeyValueFormatter(static={"backend": "echo"}).format(record("failed", exc=True))
    assert "\n" not in failed
    pairs = parse_logfmt(failed)
    assert pairs["backend"] == "echo"
    assert "ValueError: boom\nsecond line" in pairs["exc"]


def test_fields_named_like_the_fixed_keys_do_not_replace_them() -> None:
    pairs = parse_logfmt(KeyValueFormatter().format(record(KeyValues.of(level="x", msg="m"))))
    assert (pairs["level"], pairs["field.level"], pairs["msg"]) == ("warning", "x", "m")


def test_json_formatter_keeps_types() -> None:
    line = JsonFormatter().format(
        record(KeyValues.of(event="crashed", pid=42, ok=True, details={"status": -9}))
    )
    body = json.loads(line)
    assert list(body)[:3] == ["ts", "level", "logger"]
    assert (body["event"], body["pid"], body["ok"], body["details"]) == (
        "crashed",
        42,
        True,
        {"status": -9},
    )


def test_lifecycle_events_log_typed_key_values(caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog(8)
    with caplog.at_level(logging.INFO, logger="rpbroker.events"):
        log.emit(
            EventKind.CRASHED,
            service_name="echo",
            service_version="1.0.0",
            pid=42,
            reason="exited unexpectedly with status -9",
            status=-9,
        )
        log.emit(EventKind.BROKER_STOPPED)
    crashed, stopped = caplog.records
    assert crashed.levelno == logging.WARNING
    assert crashed.getMessage() == (
        'event=crashed service=echo version=1.0.0 pid=42 reason="exited unexpectedly with '
        'status -9" status=-9'
    )
    assert stopped.getMessage() == "event=broker-stopped"
    assert json.loads(JsonFormatter().format(crashed))["status"] == -9


def test_level_and_format_names_in_any_case() -> None:
    assert parse_level("DeBuG") == logging.DEBUG and parse_level(" warning ") == logging.WARNING
    assert parse_format("JSON") is LogFormat.JSON
    with pytest.raises(ValueError, match=r"expected one of debug, info, warning, error, critical"):
        parse_level("notset")
    with pytest.raises(ValueError, match=r"expected one of text, json \(got 'xml'\)"):
        parse_format("xml")
