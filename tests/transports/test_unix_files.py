"""Unix transport: reading a private file that may be a trap (FIFO, device, link, other owner).

Every refusal happens without waiting: a FIFO is refused before it is opened, and
one swapped in after the ``lstat`` opens without waiting (``O_NONBLOCK``) and is
refused by ``fstat``; a symbolic link swapped in fails the open (``O_NOFOLLOW``).
The swaps are simulated by letting the ``lstat`` see the file that was there before.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

import transports
from transports import InsecurePathError

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mknod and chown")


def private(path: Path, data: bytes = b"x = 1\n") -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_private_regular_file_is_read_up_to_one_byte_past_the_limit(sockdir: Path) -> None:
    path = private(sockdir / "a.toml", b"0123456789")
    assert transports.read_private_file(str(path), 100) == b"0123456789"
    assert transports.read_private_file(str(path), 4) == b"01234"  # the caller sees "too big"
    assert transports.read_private_file(str(sockdir / "missing"), 4) is None


def refusal(path: Path) -> InsecurePathError:
    with pytest.raises(InsecurePathError) as info:
        transports.read_private_file(str(path), 100)
    assert info.value.path == str(path)
    return info.value


@ROOT_ONLY
def test_non_regular_files_are_refused_by_kind(sockdir: Path) -> None:
    fifo = sockdir / "fifo"
    os.mkfifo(fifo, 0o600)
    directory = sockdir / "dir"
    directory.mkdir(mode=0o700)
    device = sockdir / "null"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null; root only
    sock = sockdir / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    link = sockdir / "link"
    link.symlink_to(private(sockdir / "target"))
    for path, kind in [
        (fifo, "a FIFO (named pipe)"),
        (directory, "a directory"),
        (device, "a character device"),
        (sock, "a socket"),
        (link, "a symbolic link"),
    ]:
        err = refusal(path)
        assert err.problem == f"is {kind}; only regular files are read", path
    assert refusal(link).fix == "replace the link with the file itself"
    assert refusal(fifo).fix == f"remove it (rm -r {fifo}) and write a regular file in its place"


@ROOT_ONLY
def test_another_owner_and_group_or_other_bits_are_refused(sockdir: Path) -> None:
    foreign = private(sockdir / "foreign")
    os.chown(foreign, NOBODY, NOBODY)
    err = refusal(foreign)
    assert err.problem == f"is owned by uid {NOBODY}, not by the current user (uid {os.geteuid()})"
    assert err.fix == f"run: chown {os.geteuid()} {foreign}"
    for mode in (0o640, 0o604, 0o644, 0o660, 0o602):
        loose = private(sockdir / f"loose-{mode:o}")
        loose.chmod(mode)
        err = refusal(loose)
        assert err.problem == f"has mode {mode:04o}, which gives group or other users access"
        assert err.fix == f"run: chmod 600 {loose}"


def test_a_fifo_swapped_in_after_the_lstat_is_refused_without_waiting(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lstat sees the regular file that was there; the open meets a FIFO with
    # no writer, which would block forever without O_NONBLOCK.
    path = sockdir / "a.toml"
    regular_stat = os.lstat(private(sockdir / "before"))
    os.mkfifo(path, 0o600)
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: regular_stat if p == str(path) else real_lstat(p))
    err = refusal(path)
    assert err.problem == "is a FIFO (named pipe); only regular files are read"


def test_a_symlink_swapped_in_after_the_lstat_is_refused(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sockdir / "a.toml"
    regular_stat = os.lstat(private(sockdir / "before"))
    path.symlink_to(private(sockdir / "target"))
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: regular_stat if p == str(path) else real_lstat(p))
    err = refusal(path)
    assert err.problem == "is a symbolic link; only regular files are read"


def test_reading_never_leaves_a_descriptor_open(sockdir: Path) -> None:
    good = private(sockdir / "good")
    loose = private(sockdir / "loose")
    loose.chmod(0o644)
    fifo = sockdir / "fifo"
    os.mkfifo(fifo, 0o600)
    before = transports.open_fd_count()
    for _ in range(20):
        assert transports.read_private_file(str(good), 100) == b"x = 1\n"
        for path in (loose, fifo):
            with pytest.raises(InsecurePathError):
                transports.read_private_file(str(path), 100)
    assert transports.open_fd_count() == before


def test_the_windows_reader_refuses_links_and_non_regular_files_too(sockdir: Path) -> None:
    # Pure Python over os.lstat/os.open: runs here as it would on Windows (no owner check).
    from transports._windows_files import read_private_file as windows_read

    path = private(sockdir / "a.toml", b"abc")
    assert windows_read(str(path), 2) == b"abc"
    assert windows_read(str(sockdir / "missing"), 2) is None
    link = sockdir / "link"
    link.symlink_to(path)
    os.mkfifo(sockdir / "fifo", 0o600)
    with pytest.raises(InsecurePathError, match="reparse point"):
        windows_read(str(link), 10)
    with pytest.raises(InsecurePathError, match="not a regular file"):
        windows_read(str(sockdir / "fifo"), 10)
