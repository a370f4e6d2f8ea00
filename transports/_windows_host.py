"""Facts about this host and its processes that an identity check needs (Windows).

What this module does: ``boot_id`` names the current boot from the kernel's boot
counter (the ``BootId`` value under ``Memory Management\\PrefetchParameters``,
spelled ``windows-boot-<n>`` as the v1 reference spells it), and
``process_executable`` reports the image a process runs
(``QueryFullProcessImageNameW``).

What it does not do: hash executables or compare identities
(``rpbroker.identity`` does). Like the rest of the Windows transport it has never
run on a real Windows machine (see ``transports/WINDOWS.md``); elsewhere
``boot_id`` returns ``None`` and ``process_executable`` raises
``HostFactUnavailableError``.
"""

from __future__ import annotations

import ctypes
import sys

from transports._interface import HostFactUnavailableError, ProcessGoneError

#: Registry key and value of the kernel's boot counter.
_BOOT_KEY = r"SYSTEM\CurrentControlSet\Control\Session Manager\Memory Management\PrefetchParameters"
_BOOT_VALUE = "BootId"
#: OpenProcess access right that is enough to ask for the image name (0x1000).
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
#: ``ERROR_INVALID_PARAMETER``: what OpenProcess reports for a pid that names nothing.
_ERROR_INVALID_PARAMETER = 87
#: Longest image name asked for (UTF-16 units): the NT path limit.
_IMAGE_NAME_UNITS = 32768


def boot_id() -> str | None:
    """``windows-boot-<counter>``, or ``None`` when the counter cannot be read."""
    if sys.platform != "win32":
        return None
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, _BOOT_KEY) as key:
            value, kind = winreg.QueryValueEx(key, _BOOT_VALUE)
    except OSError:
        return None
    if kind != winreg.REG_DWORD or not isinstance(value, int):
        return None
    return f"windows-boot-{value}"


def process_executable(pid: int) -> str:
    """The full image path of process ``pid``.

    Raises ``ProcessGoneError`` when no such process exists and
    ``HostFactUnavailableError`` when it cannot be asked (access denied, or not on
    Windows).
    """
    if sys.platform != "win32":
        raise HostFactUnavailableError("the Windows host facts need Windows")
    if pid <= 0:
        raise ProcessGoneError(f"pid {pid} names no process")
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.argtypes = [ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint32]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.QueryFullProcessImageNameW.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_wchar_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    kernel32.QueryFullProcessImageNameW.restype = ctypes.c_int32
    kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
    kernel32.CloseHandle.restype = ctypes.c_int32
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, 0, pid)
    if not handle:
        code = ctypes.get_last_error()
        if code == _ERROR_INVALID_PARAMETER:
            raise ProcessGoneError(f"no process {pid}")
        raise HostFactUnavailableError(f"OpenProcess({pid}) failed with Windows error {code}")
    try:
        buffer = ctypes.create_unicode_buffer(_IMAGE_NAME_UNITS)
        size = ctypes.c_uint32(_IMAGE_NAME_UNITS)
        if not kernel32.QueryFullProcessImageNameW(handle, 0, buffer, ctypes.byref(size)):
            code = ctypes.get_last_error()
            raise HostFactUnavailableError(
                f"QueryFullProcessImageNameW({pid}) failed with Windows error {code}"
            )
        return buffer.value[: size.value]
    finally:
        kernel32.CloseHandle(handle)
