"""What this process holds: ``open_fds`` and ``child_processes`` against real resources."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import transports

LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@LINUX_ONLY
def test_open_fds_names_each_new_descriptor() -> None:
    before = transports.open_fds()
    assert before is not None
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        after = transports.open_fds()
        assert after is not None
        new = {fd: target for fd, target in after.items() if before.get(fd) != target}
        assert new.keys() == {r, w, a.fileno(), b.fileno()}
        assert new[r].startswith("pipe:[") and new[r] == new[w]
        assert new[a.fileno()].startswith("socket:[")
        assert len(after) == transports.open_fd_count()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
    assert transports.open_fds() == before


@LINUX_ONLY
def test_child_processes_lists_a_child_until_it_is_reaped() -> None:
    before = transports.child_processes()
    assert before is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        children = transports.child_processes()
        assert children is not None
        assert children.keys() - before.keys() == {child.pid}
        assert children[child.pid].startswith(sys.executable)
        assert children[child.pid].endswith("import sys; sys.stdin.read()")
        assert child.stdin is not None
        child.stdin.close()  # the child exits; unreaped, it is a zombie and still listed
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        zombie = transports.child_processes()
        assert zombie is not None
        assert zombie[child.pid].startswith("[")
    finally:
        child.kill()
        child.wait()
    assert transports.child_processes() == before
