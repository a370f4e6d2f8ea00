"""Unix transport: user identity, runtime directory, private-directory checks, endpoint names.

Also the room a runtime directory leaves for backend endpoints (exact to the byte)
and the recognition of this user's backend endpoint names (for the stale sweep).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

import transports
from transports import EndpointNameError, InsecurePathError
from transports._unix import SUN_PATH_MAX_BYTES
from transports._unix_paths import is_backend_endpoint_name

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create a directory owned by another user"
)


def test_current_user_is_the_euid() -> None:
    assert transports.current_user() == str(os.geteuid())
    assert transports.PLATFORM_NAME == "unix"


def test_user_hash_is_16_hex_of_the_euid() -> None:
    value = transports.user_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", value)
    assert value == hashlib.sha256(f"uid:{os.geteuid()}".encode()).hexdigest()[:16]
    assert transports.user_hash() == value


def test_runtime_dir_under_xdg_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    old = os.umask(0o022)
    try:
        path = transports.runtime_dir()
    finally:
        os.umask(old)
    assert path == tmp_path / "rpbroker"
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    # Existing and private: accepted again.
    assert transports.runtime_dir() == path


def test_runtime_dir_without_xdg_uses_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert transports.runtime_dir(create=False) == Path(f"/tmp/rpbroker-{os.geteuid()}")


def test_runtime_dir_create_false_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = transports.runtime_dir(create=False)
    assert path == tmp_path / "rpbroker"
    assert not path.exists()


def test_runtime_dir_refuses_an_insecure_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    target = tmp_path / "rpbroker"
    target.mkdir()
    target.chmod(0o755)
    with pytest.raises(InsecurePathError) as info:
        transports.runtime_dir()
    message = str(info.value)
    assert str(target) in message
    assert "0755" in message
    assert f"chmod 700 {target}" in message
    assert info.value.path == str(target)
    # Nothing was "fixed" behind the user's back.
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o701, 0o710])
def test_verify_private_dir_refuses_group_or_other_bits(sockdir: Path, mode: int) -> None:
    sockdir.chmod(mode)
    with pytest.raises(InsecurePathError, match="chmod 700"):
        transports.verify_private_dir(sockdir)


def test_verify_private_dir_accepts_0700_and_0500(sockdir: Path) -> None:
    transports.verify_private_dir(sockdir)
    sockdir.chmod(0o500)
    try:
        transports.verify_private_dir(str(sockdir))
    finally:
        sockdir.chmod(0o700)


def test_verify_private_dir_refuses_a_symlink_to_a_good_directory(sockdir: Path) -> None:
    real = sockdir / "real"
    real.mkdir(mode=0o700)
    link = sockdir / "link"
    link.symlink_to(real)
    with pytest.raises(InsecurePathError, match="symbolic link") as info:
        transports.verify_private_dir(link)
    assert str(link) in str(info.value)


def test_verify_private_dir_refuses_a_file_and_a_missing_path(sockdir: Path) -> None:
    regular = sockdir / "file"
    regular.write_bytes(b"")
    with pytest.raises(InsecurePathError, match="not a directory"):
        transports.verify_private_dir(regular)
    with pytest.raises(InsecurePathError, match="does not exist"):
        transports.verify_private_dir(sockdir / "missing")


@ROOT_ONLY
def test_verify_private_dir_refuses_another_owner(sockdir: Path) -> None:
    other = sockdir / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(InsecurePathError, match="owned by uid 65534") as info:
        transports.verify_private_dir(other)
    assert "chown" in info.value.fix


def test_broker_endpoint_names(sockdir: Path) -> None:
    uh = transports.user_hash()
    assert transports.broker_endpoint(directory=sockdir) == str(
        sockdir / f"rpb-v1-{uh}-shared.sock"
    )
    assert transports.broker_endpoint("svc", "build-cache", directory=sockdir) == str(
        sockdir / f"rpb-v1-{uh}-svc-build-cache.sock"
    )
    assert transports.broker_endpoint("inst", "x9", directory=sockdir) == str(
        sockdir / f"rpb-v1-{uh}-inst-x9.sock"
    )


def test_broker_endpoint_defaults_to_the_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = transports.broker_endpoint()
    assert Path(path).parent == tmp_path / "rpbroker"
    assert not (tmp_path / "rpbroker").exists()


@pytest.mark.parametrize(
    "name",
    ["", "Upper", "a/b", "../x", "a.b", "a b", "a\n", "x" * 65, "é", "a_b", "a;rm"],
)
def test_broker_endpoint_rejects_bad_names(sockdir: Path, name: str) -> None:
    with pytest.raises(EndpointNameError, match="invalid"):
        transports.broker_endpoint("svc", name, directory=sockdir)


def test_broker_endpoint_accepts_a_64_char_name() -> None:
    path = transports.broker_endpoint("svc", "a" * 64, directory=Path("/t"))
    assert path.endswith("-svc-" + "a" * 64 + ".sock")


def test_broker_endpoint_rejects_bad_kinds_and_name_mismatch(sockdir: Path) -> None:
    with pytest.raises(EndpointNameError, match="unknown endpoint kind"):
        transports.broker_endpoint("be", "x", directory=sockdir)
    with pytest.raises(EndpointNameError, match="requires a name"):
        transports.broker_endpoint("svc", directory=sockdir)
    with pytest.raises(EndpointNameError, match="takes no name"):
        transports.broker_endpoint("shared", "x", directory=sockdir)


def test_endpoint_path_too_long_names_the_path_and_the_limit(sockdir: Path) -> None:
    deep = sockdir / ("d" * 60)
    with pytest.raises(EndpointNameError) as info:
        transports.broker_endpoint("svc", "a" * 40, directory=deep)
    message = str(info.value)
    assert str(deep) in message
    assert str(SUN_PATH_MAX_BYTES) in message
    with pytest.raises(EndpointNameError, match=str(SUN_PATH_MAX_BYTES)):
        transports.new_backend_endpoint(deep)


def test_endpoint_exactly_at_the_limit_is_accepted() -> None:
    suffix = f"/rpb-v1-{transports.user_hash()}-shared.sock"
    directory = "/" + "d" * (SUN_PATH_MAX_BYTES - len(suffix) - 1)
    path = transports.broker_endpoint(directory=Path(directory))
    assert len(path) == SUN_PATH_MAX_BYTES
    with pytest.raises(EndpointNameError):
        transports.broker_endpoint(directory=Path(directory + "d"))


def test_new_backend_endpoint_is_random_and_well_formed(sockdir: Path) -> None:
    uh = transports.user_hash()
    paths = {transports.new_backend_endpoint(sockdir) for _ in range(50)}
    assert len(paths) == 50
    for path in paths:
        assert re.fullmatch(rf"{re.escape(str(sockdir))}/rpb-v1-{uh}-be-[0-9a-f]{{32}}\.sock", path)


def test_new_backend_endpoint_never_returns_an_existing_path(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = iter([b"\x00" * 16, b"\x00" * 16, b"\x11" * 16])
    monkeypatch.setattr("secrets.token_bytes", lambda n: next(values))
    first = transports.new_backend_endpoint(sockdir)
    Path(first).write_bytes(b"")  # now taken
    second = transports.new_backend_endpoint(sockdir)
    assert second != first
    assert second.endswith("-be-" + "11" * 16 + ".sock")


def test_backend_endpoint_room_is_exact_and_names_the_byte_counts() -> None:
    name_bytes = len(f"/rpb-v1-{transports.user_hash()}-be-{'0' * 32}.sock")
    fits = "/" + "d" * (SUN_PATH_MAX_BYTES - name_bytes - 1)
    transports.check_backend_endpoint_room(fits)  # no error, nothing created
    assert not os.path.lexists(fits)
    assert len(transports.new_backend_endpoint(Path(fits))) == SUN_PATH_MAX_BYTES
    too_long = fits + "d"
    with pytest.raises(transports.RuntimeDirTooLongError) as info:
        transports.check_backend_endpoint_room(too_long)
    err = info.value
    assert isinstance(err, EndpointNameError)
    assert (err.directory, err.directory_bytes) == (too_long, len(too_long))
    assert (err.endpoint_bytes, err.limit_bytes) == (SUN_PATH_MAX_BYTES + 1, SUN_PATH_MAX_BYTES)
    assert err.max_directory_bytes == len(fits)
    assert f"use a runtime directory of at most {len(fits)} bytes" in str(err)


def test_backend_endpoint_names_of_this_user_are_recognised(sockdir: Path) -> None:
    mine = os.path.basename(transports.new_backend_endpoint(sockdir))
    assert is_backend_endpoint_name(mine)
    other_user = mine.replace(transports.user_hash(), "0" * 16)
    for name in [
        other_user,
        mine.removesuffix(".sock"),
        mine + ".bak",
        mine.replace("-be-", "-svc-"),
        mine[:-6] + ".sock",  # 31 hex digits
        mine.upper(),
        f"rpb-v1-{transports.user_hash()}-shared.sock",
    ]:
        assert not is_backend_endpoint_name(name), name
