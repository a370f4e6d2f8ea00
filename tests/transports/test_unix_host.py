"""Host facts for identity checks: the boot id and a process's executable, on Linux."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

import transports

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def test_boot_id_is_the_kernels() -> None:
    assert transports.boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


async def test_process_executable_of_a_child_is_the_real_image() -> None:
    child = await trio.lowlevel.open_process(["sleep", "30"])
    try:
        exe = transports.process_executable(child.pid)
        assert exe == os.readlink(f"/proc/{child.pid}/exe")
        assert os.path.basename(exe) in {"sleep", "coreutils", "busybox"}
    finally:
        child.kill()
        await child.wait()
    with pytest.raises(transports.ProcessGoneError):
        transports.process_executable(child.pid)


def test_process_executable_of_this_process_resolves_interpreter_links() -> None:
    exe = transports.process_executable(os.getpid())
    assert exe == os.path.realpath(sys.executable)
    assert not os.path.islink(exe)


@pytest.mark.parametrize("pid", [0, -1, 2**31 - 2])
def test_no_such_process(pid: int) -> None:
    with pytest.raises(transports.ProcessGoneError):
        transports.process_executable(pid)
