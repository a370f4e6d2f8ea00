"""Windows endpoint names, the user hash and the runtime directory.

What this covers: the pipe paths of broker, backend and control endpoints, the
name alphabet and length checks, the 256-character pipe path limit, the user
hash derived from the SID (through the facade over a fake API), and what
``verify_private_dir`` can and cannot check on Windows.

What it does not cover: ACLs of the runtime directory (not implemented).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import pytest

from transports._interface import EndpointNameError, InsecurePathError
from transports._windows import WindowsTransport
from transports._windows_dirs import runtime_dir, verify_private_dir
from transports._windows_names import (
    PIPE_PATH_MAX_CHARS,
    PIPE_PREFIX,
    broker_pipe_path,
    check_pipe_path,
    random_pipe_path,
    user_hash_of,
)

from .windows_fakes import DEFAULT_SID, FakeIo, FakeWindows

HASH = "0123456789abcdef"


@pytest.fixture
def transport() -> WindowsTransport:
    return WindowsTransport(FakeWindows().api(), FakeIo())


def test_user_hash_is_16_hex_of_sha256_of_the_sid(transport: WindowsTransport) -> None:
    expected = hashlib.sha256(DEFAULT_SID.encode()).hexdigest()[:16]
    assert transport.user_hash() == expected == user_hash_of(DEFAULT_SID)
    assert transport.current_user() == DEFAULT_SID


def test_current_user_is_read_once_and_cached() -> None:
    fake = FakeWindows()
    transport = WindowsTransport(fake.api(), FakeIo())
    transport.current_user()
    transport.user_hash()
    transport.current_user()
    assert len(fake.calls_to("OpenProcessToken")) == 1
    assert fake.open_handles() == []  # the token was closed


def test_broker_endpoints(transport: WindowsTransport) -> None:
    h = transport.user_hash()
    assert transport.broker_endpoint() == f"{PIPE_PREFIX}rpb-v1-{h}-shared"
    assert (
        transport.broker_endpoint("svc", "build-cache")
        == f"{PIPE_PREFIX}rpb-v1-{h}-svc-build-cache"
    )
    assert transport.broker_endpoint("inst", "a" * 64) == f"{PIPE_PREFIX}rpb-v1-{h}-inst-{'a' * 64}"
    # The directory argument exists for signature compatibility only.
    assert transport.broker_endpoint("shared", directory=Path("ignored")) == (
        f"{PIPE_PREFIX}rpb-v1-{h}-shared"
    )


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("svc", None),
        ("svc", ""),
        ("svc", "Build"),
        ("svc", "a" * 65),
        ("svc", "a/b"),
        ("inst", "a\\b"),
        ("inst", "..\\x"),
        ("svc", "x y"),
        ("shared", "x"),
        ("private", "x"),
    ],
)
def test_bad_endpoint_names_are_refused(kind: str, name: str | None) -> None:
    with pytest.raises(EndpointNameError):
        broker_pipe_path(HASH, kind, name)


def test_user_hash_must_be_16_lowercase_hex() -> None:
    with pytest.raises(EndpointNameError):
        broker_pipe_path("0123456789ABCDEF", "shared", None)
    with pytest.raises(EndpointNameError):
        random_pipe_path("abc", "be")


def test_backend_and_control_names_are_random_128_bit(transport: WindowsTransport) -> None:
    h = transport.user_hash()
    pattern = re.compile(re.escape(f"{PIPE_PREFIX}rpb-v1-{h}-be-") + "[0-9a-f]{32}")
    names = {transport.new_backend_endpoint() for _ in range(50)}
    assert len(names) == 50
    assert all(pattern.fullmatch(n) for n in names)
    assert re.fullmatch(
        re.escape(f"{PIPE_PREFIX}rpb-v1-{HASH}-ctl-") + "[0-9a-f]{32}",
        random_pipe_path(HASH, "ctl"),
    )


def test_pipe_path_limit_and_shape() -> None:
    longest = PIPE_PREFIX + "x" * (PIPE_PATH_MAX_CHARS - len(PIPE_PREFIX))
    check_pipe_path(longest)
    with pytest.raises(EndpointNameError, match="256"):
        check_pipe_path(longest + "x")
    for bad in ("\\\\server\\pipe\\x", PIPE_PREFIX, PIPE_PREFIX + "a\\b", "/tmp/x.sock"):
        with pytest.raises(EndpointNameError):
            check_pipe_path(bad)
    # Every valid broker endpoint is far below the limit.
    assert len(broker_pipe_path(HASH, "inst", "a" * 64)) < PIPE_PATH_MAX_CHARS


def test_runtime_dir_is_under_localappdata(tmp_path: Path) -> None:
    environ = {"LOCALAPPDATA": str(tmp_path)}
    path = runtime_dir(create=False, environ=environ)
    assert path == tmp_path / "rpbroker" / "run"
    assert not path.exists()
    assert runtime_dir(environ=environ) == path
    assert path.is_dir()
    with pytest.raises(InsecurePathError, match="LOCALAPPDATA"):
        runtime_dir(environ={})


def test_verify_private_dir_checks_what_it_can(tmp_path: Path) -> None:
    verify_private_dir(tmp_path)
    with pytest.raises(InsecurePathError, match="does not exist"):
        verify_private_dir(tmp_path / "missing")
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(InsecurePathError, match="not a directory"):
        verify_private_dir(file)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need a privilege on Windows")
def test_verify_private_dir_refuses_links(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    os.symlink(target, link)
    with pytest.raises(InsecurePathError, match="reparse point"):
        verify_private_dir(link)
