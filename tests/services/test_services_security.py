"""Hostile names, the services directory rule and the broker-facing error mapping."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from rpbroker.services import (
    InsecureServiceDirectory,
    InsecureServiceFile,
    InvalidServiceName,
    LoadFailure,
    ServiceDefinitionError,
    ServiceDirectoryError,
    ServiceDirectoryMissing,
    ServiceDirectoryUnusable,
    ServiceLoadError,
    ServiceNotFound,
    ensure_services_directory,
    list_services,
    load_service,
    refusal_for,
)
from rpbroker.wire.codes import RefusalCode

DEFINITION = f'service_name = "x"\ncommand = [{json.dumps(sys.executable)}]\n'


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    directory.chmod(0o700)
    return directory


HOSTILE_NAMES = [
    "../zccache",
    "..\\zccache",
    "zccache.service",
    "zccache/service",
    "Zccache",
    "../x",
    "X",
    "a.b",
    "a/b",
    "a_b",
    "a b",
    "a;rm -rf /",
    "$(id)",
    "",
    "a" * 65,
    "é",
    "zccache\n",
    "x\0",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_is_rejected_before_any_filesystem_access(tmp_path: Path, name: str) -> None:
    # The directory does not exist: a name check that ran after the directory check
    # (or after forming a path) would raise something else.
    with pytest.raises(InvalidServiceName) as info:
        load_service(tmp_path / "missing", name)
    assert info.value.name == name
    assert info.value.path is None
    assert info.value.kind is LoadFailure.INVALID_NAME


def test_traversal_cannot_reach_a_file_outside_the_directory(
    tmp_path: Path, services_dir: Path
) -> None:
    (tmp_path / "x.toml").write_text(DEFINITION)
    with pytest.raises(InvalidServiceName):
        load_service(services_dir, "../x")


def test_longest_valid_name_is_accepted(services_dir: Path) -> None:
    name = "a" * 64
    (services_dir / f"{name}.toml").write_text(DEFINITION.replace('"x"', f'"{name}"'))
    assert load_service(services_dir, name).service_name == name


def test_hostile_name_message_is_bounded() -> None:
    err = InvalidServiceName("a" * 10_000)
    assert len(str(err)) < 200


@pytest.mark.parametrize("mode", [0o750, 0o707, 0o777, 0o740, 0o701])
def test_group_or_other_accessible_directory_is_refused(services_dir: Path, mode: int) -> None:
    (services_dir / "x.toml").write_text(DEFINITION)
    services_dir.chmod(mode)
    with pytest.raises(InsecureServiceDirectory) as info:
        load_service(services_dir, "x")
    err = info.value
    assert f"{mode:04o}" in err.problem
    assert err.path == services_dir
    assert f"{mode:04o}" in str(err)
    assert f"chmod 700 {services_dir}" in str(err)
    with pytest.raises(InsecureServiceDirectory):
        list_services(services_dir)


def test_private_directory_is_accepted_and_checked_on_every_load(services_dir: Path) -> None:
    (services_dir / "x.toml").write_text(DEFINITION)
    assert load_service(services_dir, "x").service_name == "x"
    services_dir.chmod(0o755)
    with pytest.raises(InsecureServiceDirectory):
        load_service(services_dir, "x")
    services_dir.chmod(0o700)
    assert load_service(services_dir, "x").service_name == "x"


def test_symlinked_directory_is_refused_even_when_its_target_is_good(
    tmp_path: Path, services_dir: Path
) -> None:
    # Stricter than the reference, which follows the link.
    (services_dir / "x.toml").write_text(DEFINITION)
    link = tmp_path / "link"
    link.symlink_to(services_dir, target_is_directory=True)
    assert load_service(services_dir, "x").service_name == "x"
    with pytest.raises(InsecureServiceDirectory) as info:
        load_service(link, "x")
    assert "symbolic link" in info.value.problem
    assert str(services_dir) in info.value.fix
    with pytest.raises(InsecureServiceDirectory):
        list_services(link)


def test_directory_of_another_user_is_refused(services_dir: Path) -> None:
    (services_dir / "x.toml").write_text(DEFINITION)
    os.chown(services_dir, 65534, 65534)
    with pytest.raises(InsecureServiceDirectory) as info:
        load_service(services_dir, "x")
    assert "owned by uid 65534" in info.value.problem
    assert f"chown {os.geteuid()} {services_dir}" in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ServiceDirectoryMissing) as info:
        load_service(missing, "x")
    assert info.value.path == missing
    assert f"mkdir -m 700 {missing}" in str(info.value)


def test_directory_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(ServiceDirectoryUnusable, match="not a directory"):
        load_service(path, "x")


def test_service_not_found(services_dir: Path) -> None:
    with pytest.raises(ServiceNotFound) as info:
        load_service(services_dir, "x")
    assert info.value.directory == services_dir
    assert info.value.name == "x"
    assert "x.toml" in str(info.value)
    assert "x.servicedef" in str(info.value)


def test_definition_path_that_is_a_directory(services_dir: Path) -> None:
    (services_dir / "x.toml").mkdir()
    with pytest.raises(InsecureServiceFile, match="is a directory; only regular files are read"):
        load_service(services_dir, "x")


def test_ensure_services_directory_creates_private_directory(tmp_path: Path) -> None:
    path = ensure_services_directory(tmp_path / "a" / "services")
    assert path == tmp_path / "a" / "services"
    assert path.stat().st_mode & 0o777 == 0o700
    path.chmod(0o755)
    assert ensure_services_directory(path).stat().st_mode & 0o777 == 0o700
    assert list_services(path) == []


def test_refusal_mapping(services_dir: Path) -> None:
    def refusal(error: ServiceLoadError) -> tuple[RefusalCode, str]:
        return refusal_for(error)

    assert refusal(InvalidServiceName("../x")) == (
        RefusalCode.PEER_REJECTED,
        "invalid service_name",
    )
    assert refusal(ServiceNotFound(services_dir, "x")) == (
        RefusalCode.SERVICE_UNKNOWN,
        "service definition was not found",
    )
    broken = ServiceDefinitionError(services_dir / "x.toml", "command", "bad")
    assert refusal(broken) == (
        RefusalCode.SERVICE_UNKNOWN,
        f"service definition could not be loaded: {broken}",
    )
    insecure = InsecureServiceDirectory(
        services_dir, "has mode 0777", f"run: chmod 700 {services_dir}"
    )
    assert isinstance(insecure, ServiceDirectoryError)
    assert refusal(insecure)[0] is RefusalCode.SERVICE_UNKNOWN
