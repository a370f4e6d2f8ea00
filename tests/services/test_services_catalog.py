"""The broker's ``ServiceCatalog``: every rule on every load, a read only when the file changed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import transports
from rpbroker.services import (
    InsecureServiceDirectory,
    InsecureServiceFile,
    ServiceCatalog,
    ServiceDefinitionError,
    ServiceNotFound,
    write_servicedef,
)
from rpbroker.wire import ServiceDefinition

NOBODY = 65534
PY = json.dumps(sys.executable)


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the services module reads through the transport."""
    seen: list[str] = []
    real = transports.read_private_file

    def counting(path: str, limit_bytes: int) -> bytes | None:
        seen.append(os.path.basename(path))
        return real(path, limit_bytes)

    monkeypatch.setattr(transports, "read_private_file", counting)
    return seen


def write(directory: Path, text: str, name: str = "echo") -> Path:
    path = directory / f"{name}.toml"
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
    return path


def definition(timeout: int = 30, name: str = "echo") -> str:
    return f'service_name = "{name}"\ncommand = [{PY}]\nidle_timeout_secs = {timeout}\n'


def test_an_unchanged_definition_is_not_read_again(services_dir: Path, reads: list[str]) -> None:
    write(services_dir, definition())
    catalog = ServiceCatalog(services_dir)
    first = catalog.load("echo")
    for _ in range(5):
        assert catalog.load("echo") is first
    assert reads == ["echo.toml"]
    write(services_dir, definition(timeout=31))
    assert catalog.load("echo").idle_timeout_secs == 31
    assert reads == ["echo.toml", "echo.toml"]


def test_removal_fallback_and_precedence_are_seen_at_once(services_dir: Path) -> None:
    catalog = ServiceCatalog(services_dir)
    with pytest.raises(ServiceNotFound):
        catalog.load("echo")
    write_servicedef(
        services_dir, ServiceDefinition(service_name="echo", binary_path=sys.executable)
    )
    assert catalog.load("echo").source.suffix == ".servicedef"
    toml = write(services_dir, definition(timeout=7))
    assert catalog.load("echo").idle_timeout_secs == 7  # the TOML file wins
    toml.unlink()
    assert catalog.load("echo").source.suffix == ".servicedef"
    (services_dir / "echo.servicedef").unlink()
    with pytest.raises(ServiceNotFound):
        catalog.load("echo")


def test_failures_are_never_cached(services_dir: Path, reads: list[str]) -> None:
    write(services_dir, definition(timeout=-1))
    catalog = ServiceCatalog(services_dir)
    for _ in range(2):
        with pytest.raises(ServiceDefinitionError, match="idle_timeout_secs"):
            catalog.load("echo")
    assert reads == ["echo.toml", "echo.toml"]
    write(services_dir, definition())
    assert catalog.load("echo").idle_timeout_secs == 30


def _symlink_instead(path: Path) -> None:
    target = path.with_name("elsewhere.toml.real")
    target.write_bytes(path.read_bytes())
    target.chmod(0o600)
    path.unlink()
    path.symlink_to(target)


def _fifo_instead(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


CHANGES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "file chmod 0644": (lambda p: p.chmod(0o644), InsecureServiceFile, "has mode 0644"),
    "file chown": (
        lambda p: os.chown(p, NOBODY, NOBODY),
        InsecureServiceFile,
        f"owned by uid {NOBODY}",
    ),
    "file symlink": (_symlink_instead, InsecureServiceFile, "is a symbolic link"),
    "file fifo": (_fifo_instead, InsecureServiceFile, "is a FIFO"),
    "directory chmod 0755": (
        lambda p: p.parent.chmod(0o755),
        InsecureServiceDirectory,
        "has mode 0755",
    ),
    "directory chown": (
        lambda p: os.chown(p.parent, NOBODY, NOBODY),
        InsecureServiceDirectory,
        f"owned by uid {NOBODY}",
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_cached_definition_that_turns_insecure_is_refused_at_the_next_load(
    services_dir: Path, change: str
) -> None:
    path = write(services_dir, definition())
    catalog = ServiceCatalog(services_dir)
    catalog.load("echo")
    alter, error, message = CHANGES[change]
    alter(path)
    with pytest.raises(error, match=message):
        catalog.load("echo")
    # Repaired, it loads again (nothing about the refusal was cached).
    os.chown(services_dir, os.geteuid(), os.getegid())
    services_dir.chmod(0o700)
    path.unlink()
    write(services_dir, definition())
    assert catalog.load("echo").service_name == "echo"
