"""``.servicedef`` (protobuf ServiceDefinition) files: round trip, validation, precedence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rpbroker.services import (
    DEFAULT_IDLE_TIMEOUT_SECS,
    InvalidServiceName,
    Isolation,
    ServiceDefinitionError,
    ServiceSpec,
    load_service,
    write_servicedef,
)
from rpbroker.wire import ServiceDefinition
from rpbroker.wire.codes import BrokerIsolation

BINARY = "/opt/zccache/bin/zccache"


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    directory.chmod(0o700)
    return directory


def definition(**fields: object) -> ServiceDefinition:
    values: dict[str, object] = {"service_name": "zccache", "binary_path": BINARY}
    values.update(fields)
    return ServiceDefinition(**values)  # type: ignore[arg-type]


def raw_write(directory: Path, proto: ServiceDefinition, name: str = "zccache") -> Path:
    """Write bytes without the validation ``write_servicedef`` does."""
    path = directory / f"{name}.servicedef"
    path.write_bytes(proto.SerializeToString())
    return path


def load_error(directory: Path, proto: ServiceDefinition) -> ServiceDefinitionError:
    path = raw_write(directory, proto)
    with pytest.raises(ServiceDefinitionError) as info:
        load_service(directory, "zccache")
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value


def test_loader_reads_valid_service_definition(services_dir: Path) -> None:
    proto = definition(
        isolation=BrokerIsolation.EXPLICIT_INSTANCE.value,
        explicit_instance="ci-trusted",
        per_version_binary_dir="/opt/zccache",
        min_version="1.2.0",
        version_allow_list=["1.2.0", "1.2.3-alpha.1"],
        labels={"team": "build"},
    )
    path = raw_write(services_dir, proto)
    assert load_service(services_dir, "zccache") == ServiceSpec(
        service_name="zccache",
        command=(BINARY,),
        handoff=True,
        min_version="1.2.0",
        version_allow_list=("1.2.0", "1.2.3-alpha.1"),
        isolation=Isolation.EXPLICIT,
        explicit_instance="ci-trusted",
        idle_timeout_secs=DEFAULT_IDLE_TIMEOUT_SECS,
        source=path,
    )


@pytest.mark.parametrize(
    ("wire", "isolation", "instance_id"),
    [
        (BrokerIsolation.PRIVATE_BROKER, Isolation.PRIVATE, "private:zccache"),
        (BrokerIsolation.SHARED_BROKER, Isolation.SHARED, "shared"),
    ],
)
def test_isolation_mapping(
    services_dir: Path, wire: BrokerIsolation, isolation: Isolation, instance_id: str
) -> None:
    raw_write(services_dir, definition(isolation=wire.value))
    spec = load_service(services_dir, "zccache")
    assert spec.isolation is isolation
    assert spec.instance_id == instance_id
    assert spec.min_version is None
    assert spec.explicit_instance is None


def test_write_creates_private_directory_and_round_trips(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "services"
    spec = ServiceSpec(
        service_name="zccache",
        command=(BINARY,),
        min_version="1.0.0",
        version_allow_list=("1.0.0",),
        isolation=Isolation.SHARED,
        source=directory / "ignored",
    )
    path = write_servicedef(directory, spec)
    assert path == directory / "zccache.servicedef"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in directory.iterdir()] == ["zccache.servicedef"]
    loaded = load_service(directory, "zccache")
    assert loaded == ServiceSpec(
        service_name="zccache",
        command=(BINARY,),
        min_version="1.0.0",
        version_allow_list=("1.0.0",),
        isolation=Isolation.SHARED,
        source=path,
    )
    parsed = ServiceDefinition()
    parsed.ParseFromString(path.read_bytes())
    assert parsed.binary_path == BINARY
    assert BrokerIsolation(parsed.isolation) is BrokerIsolation.SHARED_BROKER


def test_write_accepts_a_proto_and_validates_it(services_dir: Path) -> None:
    write_servicedef(services_dir, definition(min_version="2.0.0"))
    assert load_service(services_dir, "zccache").min_version == "2.0.0"
    with pytest.raises(ServiceDefinitionError, match="binary_path"):
        write_servicedef(services_dir, definition(service_name="other", binary_path="rel/zc"))
    assert not (services_dir / "other.servicedef").exists()
    with pytest.raises(InvalidServiceName):
        write_servicedef(services_dir, definition(service_name="../evil"))


def test_write_refuses_a_spec_the_format_cannot_hold(services_dir: Path) -> None:
    spec = ServiceSpec(
        service_name="zccache",
        command=(BINARY, "--serve"),
        env={"A": "1"},
        source=services_dir / "zccache.toml",
    )
    with pytest.raises(ValueError, match="command arguments, env"):
        write_servicedef(services_dir, spec)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"binary_path": ""}, "binary_path", "must not be empty"),
        ({"binary_path": "bin/zccache"}, "binary_path", "must be absolute"),
        ({"binary_path": "zccache"}, "binary_path", "must be absolute"),
        ({"per_version_binary_dir": "opt/zc"}, "per_version_binary_dir", "must be absolute"),
        ({"service_name": "clud"}, "service_name", "file declares 'clud'"),
        ({"min_version": "1.0.0-alpha+build"}, "min_version", "is not a version"),
        ({"version_allow_list": ["1.0.0", "1.0.0..evil"]}, "version_allow_list", "item 1"),
        (
            {"isolation": BrokerIsolation.EXPLICIT_INSTANCE.value},
            "explicit_instance",
            "requires",
        ),
        (
            {"isolation": BrokerIsolation.SHARED_BROKER.value, "explicit_instance": "x"},
            "explicit_instance",
            "must be empty unless",
        ),
        ({"isolation": 7}, "isolation", "unknown BrokerIsolation value 7"),
    ],
)
def test_invalid_definitions_are_rejected(
    services_dir: Path, fields: dict[str, object], field: str, message: str
) -> None:
    err = load_error(services_dir, definition(**fields))
    assert err.field == field
    assert message in err.message


def test_undecodable_bytes(services_dir: Path) -> None:
    (services_dir / "zccache.servicedef").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ServiceDefinitionError, match="not a valid ServiceDefinition"):
        load_service(services_dir, "zccache")


def test_toml_wins_over_servicedef(services_dir: Path) -> None:
    raw_write(services_dir, definition())
    toml = services_dir / "zccache.toml"
    toml.write_text(f'service_name = "zccache"\ncommand = [{json.dumps(sys.executable)}]\n')
    spec = load_service(services_dir, "zccache")
    assert spec.source == toml
    assert spec.command == (sys.executable,)
    # Even a broken TOML file is not skipped in favour of the .servicedef.
    toml.write_text("not toml")
    with pytest.raises(ServiceDefinitionError) as info:
        load_service(services_dir, "zccache")
    assert info.value.path == toml
    toml.unlink()
    assert load_service(services_dir, "zccache").command == (BINARY,)


def test_rereads_changed_servicedef(services_dir: Path) -> None:
    raw_write(services_dir, definition(min_version="1.0.0"))
    assert load_service(services_dir, "zccache").min_version == "1.0.0"
    raw_write(services_dir, definition(min_version="1.1.0"))
    assert load_service(services_dir, "zccache").min_version == "1.1.0"
