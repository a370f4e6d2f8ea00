"""Broker config files, ``serve``'s flags and their precedence; errors name what to fix.

The pure part builds configs with ``rpbroker.config_file`` and ``cli.serve_settings``;
the command-line part runs the real ``rpbroker`` command and reads its stderr.
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any

import attrs
import pytest

import rpbroker
from rpbroker import __version__, cli
from rpbroker.client import default_broker_endpoint
from rpbroker.config import BrokerConfig
from rpbroker.config_file import (
    ConfigFileError,
    build_config,
    field_names,
    read_config_file,
)
from rpbroker.errors import ConfigError
from rpbroker.logfmt import LogFormat

from ..e2e.support import Workspace
from .support import environment, run_rpbroker


def toml_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return '"' + str(value.value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value) + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + " }"
    return repr(value)


def non_default(field: attrs.Attribute[Any], tmp: Path) -> Any:
    """A valid value for ``field`` that differs from its default."""
    kind = field.type
    default: Any = field.default
    if field.name in ("services_dir", "runtime_dir"):
        return tmp / field.name
    if field.name == "socket_path":
        return str(tmp / "b.sock")
    if kind is bool:
        return not default
    if kind is float:
        return default * 2 + 1
    if kind is int:
        return default + 1
    if kind is str:
        return "other"
    if kind == dict[str, str]:
        return {"K": "V"}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return next(member for member in kind if member != default)
    raise AssertionError(f"no test value for BrokerConfig.{field.name} ({kind!r})")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_field_can_be_set_from_a_file(tmp_path: Path) -> None:
    fields = attrs.fields(attrs.resolve_types(BrokerConfig))
    wanted = {field.name: non_default(field, tmp_path) for field in fields}
    assert tuple(wanted) == field_names()
    text = "".join(f"{name} = {toml_value(value)}\n" for name, value in wanted.items())
    for document in (text, "[broker]\n" + text):
        config = build_config(read_config_file(write(tmp_path / "b.toml", document)), {})
        for name, value in wanted.items():
            got = getattr(config, name)
            assert got == (Path(value) if isinstance(value, Path) else value), name


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    file = write(etc / "b.toml", 'services_dir = "svc"\nsocket_path = "run/b.sock"\n')
    monkeypatch.chdir(tmp_path)
    config = build_config(read_config_file("etc/b.toml"), {})
    assert config.services_dir == etc / "svc"
    assert config.socket_path == str(etc / "run" / "b.sock")
    assert file.exists()


SECONDS = "a positive number of seconds"
PATH = "a path (a non-empty string)"


@pytest.mark.parametrize(
    ("key", "toml", "expected", "got"),
    [
        ("drain_timeout_s", "-1", SECONDS, "-1"),
        ("drain_timeout_s", '"10"', SECONDS, '"10"'),
        ("handoff_enabled", '"false"', "true or false", '"false"'),
        ("hello_rate_limit", "1.5", "a positive integer", "1.5"),
        ("hello_rate_limit", "0", "a positive integer", "0"),
        ("instance_name", "3", "a string", "3"),
        ("runtime_dir", "3", PATH, "3"),
        ("socket_path", "[]", PATH, "[]"),
        ("backend_env", "{ A = 1 }", "a table of string values", "{'A': 1}"),
    ],
)
def test_a_bad_value_names_the_file_and_field(
    tmp_path: Path, key: str, toml: str, expected: str, got: str
) -> None:
    file = write(tmp_path / "b.toml", f'services_dir = "/srv/svc"\n{key} = {toml}\n')
    with pytest.raises(ConfigFileError) as caught:
        build_config(read_config_file(file), {})
    assert str(caught.value) == f"{file}: field '{key}': expected {expected} (got {got})"


@pytest.mark.parametrize(
    ("key", "guess"),
    [("drain_timout_s", "drain_timeout_s"), ("drain-timeout", "drain_timeout_s"),
     ("services", "services_dir")],
)  # fmt: skip
def test_unknown_keys_are_errors_with_a_guess(tmp_path: Path, key: str, guess: str) -> None:
    file = write(tmp_path / "b.toml", f'services_dir = "/srv"\n"{key}" = 3\n')
    with pytest.raises(ConfigFileError) as caught:
        read_config_file(file)
    assert str(caught.value) == f"{file}: unknown key '{key}'; did you mean '{guess}'?"


def test_file_shape_errors_name_the_file(tmp_path: Path) -> None:
    mixed = write(tmp_path / "mixed.toml", 'services_dir = "/s"\n[broker]\ndrain_timeout_s = 1\n')
    with pytest.raises(ConfigFileError, match=r"mixed\.toml: keys outside the \[broker\] table"):
        read_config_file(mixed)
    broken = write(tmp_path / "broken.toml", "services_dir = \n")
    with pytest.raises(ConfigFileError, match=r"broken\.toml: not valid TOML: .*line 1"):
        read_config_file(broken)
    with pytest.raises(ConfigFileError, match=r"missing\.toml: cannot read the config file"):
        read_config_file(tmp_path / "missing.toml")


def settings(argv: list[str], environ: dict[str, str] | None = None) -> cli.ServeSettings:
    args = cli._parser().parse_args(["serve", *argv])
    return cli.serve_settings(args, environ or {})


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    file = write(tmp_path / "b.toml", 'services_dir = "/srv/a"\ndrain_timeout_s = 7\n')
    assert settings(["--config", str(file)]).config.drain_timeout_s == 7
    flagged = settings(["--config", str(file), "--drain-timeout", "3", "--services", "/srv/b"])
    assert (flagged.config.drain_timeout_s, flagged.config.services_dir) == (3, Path("/srv/b"))
    assert settings(["--services", "/srv/c"]).config.drain_timeout_s == 10
    # A bad file value that a flag replaces is not an error: the flag wins.
    bad = write(tmp_path / "bad.toml", 'services_dir = "/srv/a"\ndrain_timeout_s = -1\n')
    assert settings(["--config", str(bad), "--drain-timeout", "2"]).config.drain_timeout_s == 2
    switched = settings(["--services", "/s", "--no-handoff", "--no-idle-check"]).config
    assert (switched.handoff_enabled, switched.idle_check_enabled) == (False, False)


def test_socket_comes_from_the_flag_then_the_environment_then_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "b.toml", 'services_dir = "/s"\nsocket_path = "/run/file.sock"\n')
    env = {"RPBROKER_SOCKET": "/run/env.sock"}
    base = ["--config", str(file)]
    assert settings([*base, "--socket", "/run/flag.sock"], env).config.socket_path == (
        "/run/flag.sock"
    )
    assert settings(base, env).config.socket_path == "/run/env.sock"
    assert settings(base).config.socket_path == "/run/file.sock"
    # Nothing anywhere: left unset, so the broker serves a socket systemd passed,
    # else binds the same per-user endpoint clients and admin commands use.
    unset = settings(["--services", "/s"]).config
    assert unset.socket_path is None
    assert rpbroker.Broker(unset).socket_path == default_broker_endpoint()


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(["--services", "/s", "--drain-timeout", "-1", "--hello-rate-limit", "0"])
    assert str(caught.value).splitlines() == [
        "--drain-timeout: must be a positive number of seconds (got -1)",
        "--hello-rate-limit: must be a positive integer (got 0)",
    ]


def test_log_level_is_case_insensitive_and_passed_to_backends() -> None:
    chosen = settings(["--services", "/s", "--log-level", "DeBuG", "--log-format", "JSON"])
    assert (chosen.log_level, chosen.log_format) == (logging.DEBUG, LogFormat.JSON)
    assert chosen.config.backend_env["RPBROKER_LOG_LEVEL"] == "debug"
    assert chosen.config.backend_env["RPBROKER_LOG_FORMAT"] == "json"
    from_env = settings(["--services", "/s"], {"RPBROKER_LOG_LEVEL": "Warning"})
    assert from_env.log_level == logging.WARNING
    with pytest.raises(ConfigError, match=r"^\$RPBROKER_LOG_LEVEL: expected one of debug"):
        settings(["--services", "/s"], {"RPBROKER_LOG_LEVEL": "loud"})


def test_the_config_files_backend_env_wins_over_the_log_settings(tmp_path: Path) -> None:
    file = write(
        tmp_path / "b.toml",
        'services_dir = "/s"\n[backend_env]\nRPBROKER_LOG_LEVEL = "error"\nOTHER = "x"\n',
    )
    env = settings(["--config", str(file), "--log-level", "debug"]).config.backend_env
    assert env == {"RPBROKER_LOG_LEVEL": "error", "RPBROKER_LOG_FORMAT": "text", "OTHER": "x"}


# -- the real command -------------------------------------------------------------------


async def test_the_command_names_the_flag_not_the_field(workspace: Workspace) -> None:
    result = await run_rpbroker(
        "serve", "--services", str(workspace.services), "--drain-timeout", "-1"
    )
    assert result.returncode == cli.ExitStatus.USAGE
    assert "rpbroker serve: error: --drain-timeout: must be a positive number of seconds" in (
        result.stderr
    )
    assert "BrokerConfig" not in result.stderr and "drain_timeout_s" not in result.stderr
    unparsable = await run_rpbroker("serve", "--services", "/s", "--hello-timeout", "soon")
    assert unparsable.returncode == cli.ExitStatus.USAGE
    assert "argument --hello-timeout: expected a number of seconds (got 'soon')" in (
        unparsable.stderr
    )


async def test_the_command_names_the_config_file_and_field(workspace: Workspace) -> None:
    file = write(
        workspace.root / "broker.toml",
        f'[broker]\nservices_dir = "{workspace.services}"\nack_deadline_s = 0\n',
    )
    result = await run_rpbroker("serve", "--config", str(file))
    assert result.returncode == cli.ExitStatus.USAGE
    assert result.stderr == (
        f"rpbroker serve: error: {file}: field 'ack_deadline_s': "
        "expected a positive number of seconds (got 0)\n"
    )
    missing = await run_rpbroker("serve")
    assert missing.returncode == cli.ExitStatus.USAGE
    assert "no services directory: pass --services DIR" in missing.stderr


async def test_version_and_help() -> None:
    version = await run_rpbroker("--version", env=environment())
    assert (version.returncode, version.stdout) == (
        0,
        f"rpbroker {__version__} (running-process broker protocol v1)\n",
    )
    helped = await run_rpbroker("serve", "--help")
    assert helped.returncode == 0
    for flag in cli.SERVE_FLAGS:
        assert flag.flag in helped.stdout
    assert "--drain-timeout SECONDS" in helped.stdout and "(default: 10 s)" in helped.stdout
