"""The ``[foreign]`` table: a backend that is not an rpbroker SDK process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import rpbroker
from rpbroker.preflight import ForeignEndpointTooLong, check_broker_start
from rpbroker.services import ForeignReady, ServiceDefinitionError, load_service

PY = json.dumps(sys.executable)


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir(mode=0o700)
    return directory


def write(directory: Path, text: str, name: str = "legacy") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def foreign(table: str, command: str = f"[{PY}]", extra: str = "") -> str:
    return f'service_name = "legacy"\ncommand = {command}\n{extra}[foreign]\n{table}\n'


def error(directory: Path, text: str) -> ServiceDefinitionError:
    path = write(directory, text)
    with pytest.raises(ServiceDefinitionError) as info:
        load_service(directory, "legacy")
    assert info.value.path == path
    return info.value


def test_a_template_endpoint_and_endpoint_argument_load(services_dir: Path) -> None:
    write(
        services_dir,
        foreign(
            'endpoint = "{runtime_dir}/{service}-{version}-{token}.sock"\nready = "connect"',
            command=f'[{PY}, "--listen={{endpoint}}", "{{{{literal}}}}", "{{services_dir}}"]',
        ),
    )
    spec = load_service(services_dir, "legacy")
    assert spec.foreign is not None
    assert spec.foreign.ready is ForeignReady.CONNECT
    assert spec.foreign.ready_timeout_secs is None
    assert spec.foreign.per_incarnation
    assert spec.handoff is False
    assert spec.argv("/run/x.sock") == (
        sys.executable,
        "--listen=/run/x.sock",
        "{literal}",
        str(services_dir),
    )
    assert spec.foreign.endpoint_for("/run", "legacy", "1.2.3", "ab") == "/run/legacy-1.2.3-ab.sock"


def test_a_fixed_endpoint_defaults_to_probe_readiness(services_dir: Path) -> None:
    write(services_dir, foreign('endpoint = "/tmp/legacy.sock"\nready_timeout_secs = 2'))
    spec = load_service(services_dir, "legacy")
    assert spec.foreign is not None
    assert (spec.foreign.ready, spec.foreign.ready_timeout_secs) == (ForeignReady.PROBE, 2.0)
    assert not spec.foreign.per_incarnation


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        (foreign('ready = "probe"'), "foreign.endpoint", "required key is missing"),
        (foreign('endpoint = "x.sock"'), "foreign.endpoint", "is not an absolute path"),
        (foreign('endpoint = "/r/{pid}.sock"'), "foreign.endpoint", "{runtime_dir}, {service}"),
        (foreign('endpoint = "/x.sock"\nready = "soon"'), "foreign.ready", "'probe', 'connect'"),
        (foreign('endpoint = "/x.sock"\nreadyy = 1'), "foreign.readyy", "did you mean 'ready'"),
        (
            foreign('endpoint = "/x.sock"\nready_timeout_secs = 0'),
            "foreign.ready_timeout_secs",
            "greater than 0",
        ),
        (
            foreign('endpoint = "/x.sock"', extra="handoff = true\n"),
            "handoff",
            "no control channel",
        ),
        (
            foreign('endpoint = "/x.sock"', command='["{endpoint}"]'),
            "command",
            "command[0] must name the program",
        ),
        (
            f'service_name = "legacy"\ncommand = [{PY}, "{{endpoint}}"]\n',
            "command",
            "only known for a foreign backend",
        ),
        (f'service_name = "legacy"\ncommand = [{PY}]\nforeign = 3\n', "foreign", "a table"),
    ],
)
def test_mistakes_name_the_field_and_the_fix(
    services_dir: Path, text: str, field: str, says: str
) -> None:
    err = error(services_dir, text)
    assert err.field == field
    assert says in str(err)


def test_start_refuses_a_foreign_endpoint_too_long_for_a_socket(tmp_path: Path) -> None:
    services = tmp_path / "svc"
    services.mkdir(mode=0o700)
    runtime = Path("/tmp") / f"rpb-len-{tmp_path.name[-8:]}"
    runtime.mkdir(mode=0o700)
    try:
        path = write(services, foreign('endpoint = "{runtime_dir}/' + "x" * 100 + '-{token}.sock"'))
        config = rpbroker.BrokerConfig(services_dir=services, runtime_dir=runtime)
        with pytest.raises(ForeignEndpointTooLong) as info:
            check_broker_start(config)
        message = str(info.value)
        assert str(path) in message and "foreign.endpoint" in message
        assert "Shorten the template" in message
    finally:
        runtime.rmdir()
