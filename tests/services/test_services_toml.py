"""TOML service definitions: structuring, defaults, per-field errors, placeholders."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from rpbroker.services import (
    DEFAULT_IDLE_TIMEOUT_SECS,
    Isolation,
    ServiceDefinitionError,
    ServiceSpec,
    list_services,
    load_service,
)

PY = json.dumps(sys.executable)  # a TOML basic string holding an absolute interpreter path
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    directory.chmod(0o700)
    return directory


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def minimal(name: str = "echo", extra: str = "") -> str:
    return f'service_name = "{name}"\ncommand = [{PY}]\n{extra}'


def load_error(directory: Path, text: str, name: str = "echo") -> ServiceDefinitionError:
    path = write(directory, name, text)
    with pytest.raises(ServiceDefinitionError) as info:
        load_service(directory, name)
    err = info.value
    assert err.path == path
    assert str(path) in str(err)
    return err


# -- valid files ---------------------------------------------------------------


def test_full_file_loads_every_field(services_dir: Path) -> None:
    path = write(
        services_dir,
        "zccache",
        f"""
service_name = "zccache"
command = [{PY}, "-m", "zccache", "--serve"]
handoff = false
min_version = "1.2.0"
version_allow_list = ["1.2.0", "1.3.0-rc.1"]
isolation = "explicit"
explicit_instance = "ci-trusted"
idle_timeout_secs = 12.5
env = {{ RUST_LOG = "debug", EMPTY = "" }}
""",
    )
    spec = load_service(services_dir, "zccache")
    assert spec == ServiceSpec(
        service_name="zccache",
        command=(sys.executable, "-m", "zccache", "--serve"),
        handoff=False,
        min_version="1.2.0",
        version_allow_list=("1.2.0", "1.3.0-rc.1"),
        isolation=Isolation.EXPLICIT,
        explicit_instance="ci-trusted",
        idle_timeout_secs=12.5,
        env={"RUST_LOG": "debug", "EMPTY": ""},
        source=path,
    )
    assert spec.instance_id == "explicit:ci-trusted"


def test_defaults(services_dir: Path) -> None:
    write(services_dir, "echo", minimal())
    spec = load_service(services_dir, "echo")
    assert spec.command == (sys.executable,)
    assert spec.handoff is True
    assert spec.min_version is None
    assert spec.version_allow_list == ()
    assert spec.isolation is Isolation.PRIVATE
    assert spec.explicit_instance is None
    assert spec.idle_timeout_secs == DEFAULT_IDLE_TIMEOUT_SECS == 30.0
    assert dict(spec.env) == {}
    assert spec.instance_id == "private:echo"


def test_integer_idle_timeout_becomes_float(services_dir: Path) -> None:
    write(services_dir, "echo", minimal(extra="idle_timeout_secs = 300\n"))
    spec = load_service(services_dir, "echo")
    assert spec.idle_timeout_secs == 300.0
    assert isinstance(spec.idle_timeout_secs, float)


def test_shared_isolation_and_empty_explicit_instance(services_dir: Path) -> None:
    write(services_dir, "echo", minimal(extra='isolation = "shared"\nexplicit_instance = ""\n'))
    spec = load_service(services_dir, "echo")
    assert spec.isolation is Isolation.SHARED
    assert spec.explicit_instance is None
    assert spec.instance_id == "shared"


def test_spec_is_immutable_and_hashable(services_dir: Path) -> None:
    write(services_dir, "echo", minimal(extra='env = { A = "1" }\n'))
    spec = load_service(services_dir, "echo")
    with pytest.raises(TypeError):
        spec.env["A"] = "2"  # type: ignore[index]
    assert hash(spec) == hash(load_service(services_dir, "echo"))


def test_bare_command_is_resolved_on_path(
    services_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "my-backend"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bindir))
    write(services_dir, "echo", 'service_name = "echo"\ncommand = ["my-backend", "--x"]\n')
    assert load_service(services_dir, "echo").command == (str(program), "--x")


def test_file_edit_is_seen_by_next_load(services_dir: Path) -> None:
    write(services_dir, "echo", minimal(extra="idle_timeout_secs = 1\n"))
    assert load_service(services_dir, "echo").idle_timeout_secs == 1.0
    write(services_dir, "echo", minimal(extra="idle_timeout_secs = 2\n"))
    assert load_service(services_dir, "echo").idle_timeout_secs == 2.0
    write(services_dir, "echo", minimal(extra="idle_timeout_secs = -2\n"))
    with pytest.raises(ServiceDefinitionError):
        load_service(services_dir, "echo")


# -- structural errors (cattrs) ---------------------------------------------------


def test_wrong_type_names_file_field_and_fix(services_dir: Path) -> None:
    err = load_error(services_dir, 'service_name = "echo"\ncommand = 5\n')
    assert err.field == "command"
    assert str(err) == (
        f"{services_dir / 'echo.toml'}: field 'command': expected a list of strings (got integer)"
    )


def test_wrong_item_type_in_command(services_dir: Path) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = [{PY}, 3]\n')
    assert err.field == "command"
    assert "item 1 is integer" in err.message


def test_string_command_is_not_split_into_characters(services_dir: Path) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = {PY}\n')
    assert err.field == "command"
    assert "got string" in err.message


@pytest.mark.parametrize(
    ("extra", "field", "expected"),
    [
        ('handoff = "yes"\n', "handoff", "expected true or false (got string)"),
        ("idle_timeout_secs = true\n", "idle_timeout_secs", "expected a number (got boolean)"),
        ("min_version = 1\n", "min_version", "expected a string (got integer)"),
        ("env = { A = 1 }\n", "env", "value of 'A' is integer"),
        ('env = "A=1"\n', "env", "expected a table of string values (got string)"),
        ('version_allow_list = "1.0.0"\n', "version_allow_list", "expected a list of strings"),
    ],
)
def test_wrong_types_are_not_coerced(
    services_dir: Path, extra: str, field: str, expected: str
) -> None:
    err = load_error(services_dir, minimal(extra=extra))
    assert err.field == field
    assert expected in err.message


def test_wrong_type_for_service_name(services_dir: Path) -> None:
    err = load_error(services_dir, f"service_name = 7\ncommand = [{PY}]\n")
    assert err.field == "service_name"
    assert "expected a string (got integer)" in err.message


def test_unknown_key_is_refused_with_suggestion(services_dir: Path) -> None:
    err = load_error(services_dir, minimal(extra="idle_timeout = 5\n"))
    assert err.field == "idle_timeout"
    assert "unknown key" in err.message
    assert "did you mean 'idle_timeout_secs'" in err.message


def test_missing_required_key(services_dir: Path) -> None:
    err = load_error(services_dir, 'service_name = "echo"\n')
    assert err.field == "command"
    assert "required key is missing" in err.message


def test_several_problems_are_reported_in_one_error(services_dir: Path) -> None:
    err = load_error(services_dir, 'service_name = "echo"\ncommand = 1\nhandoff = 2\nbogus = 3\n')
    assert err.field == "command"
    assert "field 'handoff'" in err.message
    assert "field 'bogus'" in err.message


def test_bad_isolation_value(services_dir: Path) -> None:
    err = load_error(services_dir, minimal(extra='isolation = "public"\n'))
    assert err.field == "isolation"
    assert "'private', 'shared', 'explicit'" in err.message
    assert "'public'" in err.message


def test_toml_syntax_error_names_file_and_line(services_dir: Path) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = [{PY}\nhandoff = true\n')
    assert err.field is None
    assert "invalid TOML" in str(err)
    assert "at line 3" in str(err)


def test_toml_error_at_end_of_file_names_the_last_line(services_dir: Path) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = [{PY}\n')
    assert err.field is None
    assert "Unclosed array" in err.message
    assert "line 2" in err.message


def test_non_utf8_file(services_dir: Path) -> None:
    (services_dir / "echo.toml").write_bytes(b'service_name = "\xff"\n')
    with pytest.raises(ServiceDefinitionError, match="UTF-8"):
        load_service(services_dir, "echo")


# -- semantic errors ---------------------------------------------------------------


def test_empty_command(services_dir: Path) -> None:
    err = load_error(services_dir, 'service_name = "echo"\ncommand = []\n')
    assert err.field == "command"
    assert "non-empty" in err.message


def test_empty_command_element(services_dir: Path) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = [{PY}, ""]\n')
    assert err.field == "command"
    assert "command[1] must not be empty" in err.message


def test_relative_command_path_with_separator(services_dir: Path) -> None:
    err = load_error(services_dir, 'service_name = "echo"\ncommand = ["bin/echo"]\n')
    assert err.field == "command"
    assert "relative path" in err.message


def test_command_not_on_path(services_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.fspath(services_dir))
    err = load_error(services_dir, 'service_name = "echo"\ncommand = ["no-such-backend-xyz"]\n')
    assert err.field == "command"
    assert "command[0] 'no-such-backend-xyz' was not found on PATH" in err.message


def test_explicit_without_instance(services_dir: Path) -> None:
    err = load_error(services_dir, minimal(extra='isolation = "explicit"\n'))
    assert err.field == "explicit_instance"
    assert "requires" in err.message


def test_explicit_with_invalid_instance(services_dir: Path) -> None:
    err = load_error(
        services_dir, minimal(extra='isolation = "explicit"\nexplicit_instance = "CI/x"\n')
    )
    assert err.field == "explicit_instance"


@pytest.mark.parametrize("isolation", ["private", "shared"])
def test_instance_without_explicit_isolation(services_dir: Path, isolation: str) -> None:
    err = load_error(
        services_dir,
        minimal(extra=f'isolation = "{isolation}"\nexplicit_instance = "ci-trusted"\n'),
    )
    assert err.field == "explicit_instance"
    assert "explicit_instance must be empty unless isolation is 'explicit'" in err.message


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0+build", "", "1.0.0; rm -rf /"])
def test_bad_min_version(services_dir: Path, version: str) -> None:
    err = load_error(services_dir, minimal(extra=f"min_version = {json.dumps(version)}\n"))
    assert err.field == "min_version"
    assert "is not a version" in err.message


def test_bad_allow_list_entry(services_dir: Path) -> None:
    err = load_error(
        services_dir, minimal(extra='version_allow_list = ["1.0.0", "1.0.0-../../evil"]\n')
    )
    assert err.field == "version_allow_list"
    assert "item 1" in err.message


def test_name_mismatch(services_dir: Path) -> None:
    err = load_error(services_dir, minimal(name="clud"), name="zccache")
    assert err.field == "service_name"
    assert "file declares 'clud' but was loaded as 'zccache'" in err.message


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_idle_timeout(services_dir: Path, value: str) -> None:
    err = load_error(services_dir, minimal(extra=f"idle_timeout_secs = {value}\n"))
    assert err.field == "idle_timeout_secs"
    assert "greater than 0" in err.message


def test_bad_env_key(services_dir: Path) -> None:
    err = load_error(services_dir, minimal(extra='env = { "A=B" = "1" }\n'))
    assert err.field == "env"


# -- placeholders ------------------------------------------------------------------


def test_placeholders_are_substituted(services_dir: Path) -> None:
    write(
        services_dir,
        "echo",
        'service_name = "echo"\n'
        'command = ["{python}", "{services_dir}/../b.py", "{{literal}}", "a}}b{{"]\n',
    )
    spec = load_service(services_dir, "echo")
    assert spec.command == (
        sys.executable,
        f"{services_dir}/../b.py",
        "{literal}",
        "a}b{",
    )


def test_services_dir_placeholder_is_absolute(
    services_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(services_dir, "echo", minimal(extra="").replace("]", ', "{services_dir}"]'))
    monkeypatch.chdir(services_dir.parent)
    spec = load_service("services", "echo")
    assert spec.command[1] == str(services_dir)
    assert spec.source == services_dir / "echo.toml"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("{pyhton}", "unknown placeholder '{pyhton}'"),
        ("{}", "unknown placeholder '{}'"),
        ("{python", "unmatched '{'"),
        ("x}", "unmatched '}'"),
    ],
)
def test_bad_placeholders(services_dir: Path, arg: str, expected: str) -> None:
    err = load_error(services_dir, f'service_name = "echo"\ncommand = [{PY}, "{arg}"]\n')
    assert err.field == "command"
    assert expected in err.message


# -- listing and the shipped example -------------------------------------------------


def test_list_services(services_dir: Path) -> None:
    write(services_dir, "b", minimal("b"))
    write(services_dir, "a", minimal("a"))
    (services_dir / "a.servicedef").write_bytes(b"")
    (services_dir / "c.servicedef").write_bytes(b"")
    (services_dir / "Bad.toml").write_text("")
    (services_dir / "notes.txt").write_text("")
    (services_dir / "dir.toml").mkdir()
    assert list_services(services_dir) == ["a", "b", "c"]


def test_example_echo_definition_loads(tmp_path: Path) -> None:
    services = tmp_path / "services"
    services.mkdir(mode=0o700)
    services.chmod(0o700)
    shutil.copy(REPO / "examples" / "services" / "echo.toml", services / "echo.toml")
    (services / "echo.toml").chmod(0o600)  # git does not keep the mode it needs
    spec = load_service(services, "echo")
    assert spec.command == (sys.executable, f"{services}/../echo_backend.py")
    assert spec.handoff is True
    assert spec.min_version == "1.0.0"
    assert spec.idle_timeout_secs == 300.0
    assert spec.isolation is Isolation.PRIVATE
