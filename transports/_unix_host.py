"""Facts about this host and its processes that an identity check needs (Linux, macOS).

What this module does: ``boot_id`` names the current boot of the machine (Linux:
the kernel's random ``boot_id``; macOS: the boot time, spelled as the v1 reference
spells it), and ``process_executable`` reports the on-disk image a running process
was started from (Linux: the ``/proc/<pid>/exe`` link; macOS: ``proc_pidpath``).
Both are what the v1 reference reads for the same purpose, so identities built
here compare equal to the ones its processes report.

What it does not do: hash executables, compare identities or decide what a
mismatch means (``rpbroker.identity`` does). Other Unix systems have neither
fact here: ``boot_id`` returns ``None`` and ``process_executable`` raises
``HostFactUnavailableError``.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_host is part of the Unix transport"

import ctypes
import errno
import os

from transports._interface import HostFactUnavailableError, ProcessGoneError

#: Where Linux publishes a random UUID chosen afresh at every boot.
LINUX_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

#: Size of the buffer ``proc_pidpath`` fills (bytes): ``PROC_PIDPATHINFO_MAXSIZE``,
#: 4 * MAXPATHLEN in <sys/proc_info.h>.
_DARWIN_PIDPATH_BYTES = 4 * 1024


class _Timeval(ctypes.Structure):
    """``struct timeval`` as macOS lays it out (``suseconds_t`` is 32-bit there)."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_int32)]


def boot_id() -> str | None:
    """A string that names the current boot of this machine, or ``None`` if unknown.

    Linux: the trimmed content of ``/proc/sys/kernel/random/boot_id``. macOS:
    ``macos-boot-<seconds>-<microseconds>`` of ``kern.boottime``. ``None`` when
    the platform offers neither or reading it fails.
    """
    if sys.platform == "linux":
        try:
            with open(LINUX_BOOT_ID_PATH, encoding="ascii") as file:
                value = file.read().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return value or None
    if sys.platform == "darwin":
        return _darwin_boot_id()
    return None


def process_executable(pid: int) -> str:
    """The path of the executable process ``pid`` runs, as the kernel reports it.

    Raises ``ProcessGoneError`` when no such process exists and
    ``HostFactUnavailableError`` when it exists but its executable cannot be read
    (another user's process, or a platform without the fact).
    """
    if pid <= 0:
        raise ProcessGoneError(f"pid {pid} names no process")
    if sys.platform == "linux":
        return _linux_process_executable(pid)
    if sys.platform == "darwin":
        return _darwin_process_executable(pid)
    raise HostFactUnavailableError(
        f"reading another process's executable is not implemented on {sys.platform}"
    )


def _linux_process_executable(pid: int) -> str:
    link = f"/proc/{pid}/exe"
    try:
        return os.readlink(link)
    except FileNotFoundError as exc:
        raise ProcessGoneError(f"no process {pid} ({link} is missing)") from exc
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGoneError(f"no process {pid}") from exc
        raise HostFactUnavailableError(
            f"cannot read {link}: {exc.strerror}; only processes of the current user "
            "can be inspected"
        ) from exc


def _libc() -> ctypes.CDLL:
    # dlopen(NULL): on macOS the process image links libSystem, which exports
    # proc_pidpath and sysctlbyname.
    return ctypes.CDLL(None, use_errno=True)


def _darwin_process_executable(pid: int) -> str:
    libc = _libc()
    proc_pidpath = libc.proc_pidpath
    proc_pidpath.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    proc_pidpath.restype = ctypes.c_int
    buffer = ctypes.create_string_buffer(_DARWIN_PIDPATH_BYTES)
    written = proc_pidpath(pid, buffer, _DARWIN_PIDPATH_BYTES)
    if written <= 0:
        code = ctypes.get_errno()
        if code == errno.ESRCH:
            raise ProcessGoneError(f"no process {pid}")
        raise HostFactUnavailableError(
            f"proc_pidpath({pid}) failed: {os.strerror(code)}; only processes of the "
            "current user can be inspected"
        )
    return os.fsdecode(buffer.value)


def _darwin_boot_id() -> str | None:
    libc = _libc()
    sysctlbyname = libc.sysctlbyname
    sysctlbyname.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    sysctlbyname.restype = ctypes.c_int
    boot = _Timeval()
    size = ctypes.c_size_t(ctypes.sizeof(boot))
    if sysctlbyname(b"kern.boottime", ctypes.byref(boot), ctypes.byref(size), None, 0) != 0:
        return None
    return f"macos-boot-{boot.tv_sec}-{boot.tv_usec}"
