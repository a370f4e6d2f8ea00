"""The Windows transport's ctypes layer and facade, checked on any platform.

What this covers: the package imports on a non-Windows platform and the facade
refuses clearly without an injected API; every function the ``Win32Api`` wrapper
calls has declared argtypes/restype; structure layouts match the Windows SDK on
64-bit; ``Win32Api`` turns failing calls into ``Win32Error`` with the last error,
normalizes NULL/INVALID handles, and performs the GetTokenInformation
size-then-fill sequence, freeing what Windows allocated.

What it does not cover: the real DLLs (there is no Windows machine here).
"""

from __future__ import annotations

import ctypes
import sys

import pytest

import transports._windows as facade
from transports._interface import TransportError
from transports._windows_api import (
    ADVAPI32_SIGNATURES,
    ERROR_ACCESS_DENIED,
    ERROR_INSUFFICIENT_BUFFER,
    ERROR_INVALID_HANDLE,
    FILE_COMPLETION_INFORMATION,
    FILE_REPLACE_COMPLETION_INFORMATION_CLASS,
    INVALID_HANDLE_VALUE,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    KERNEL32_SIGNATURES,
    NTDLL_SIGNATURES,
    OVERLAPPED,
    SECURITY_ATTRIBUTES,
    TOKEN_QUERY,
    TOKEN_USER,
    TOKEN_USER_CLASS,
    Advapi32,
    Kernel32,
    Ntdll,
    Win32Error,
    as_handle,
    is_valid_handle,
    load_win32_api,
)

from .windows_fakes import DEFAULT_SID, FakeWindows

NON_WINDOWS = pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows gate")


def _protocol_methods(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if name[:1].isupper()}


@NON_WINDOWS
def test_facade_imports_and_refuses_without_an_injected_api() -> None:
    facade.set_default_transport(None)
    assert facade.PLATFORM_NAME == "windows"
    assert facade.open_fd_count() is None
    assert facade.open_fds() is None
    assert facade.child_processes() is None
    for call in (facade.current_user, facade.user_hash, facade.open_control_pair):
        with pytest.raises(TransportError, match="non-Windows platform"):
            call()
    with pytest.raises(TransportError, match="non-Windows platform"):
        facade.broker_endpoint("shared")
    with pytest.raises(TransportError, match="non-Windows platform"):
        load_win32_api()


@NON_WINDOWS
async def test_async_facade_functions_refuse_without_an_injected_api() -> None:
    facade.set_default_transport(None)
    with pytest.raises(TransportError, match="non-Windows platform"):
        await facade.connect("\\\\.\\pipe\\rpb-v1-0123456789abcdef-shared")
    with pytest.raises(TransportError, match="non-Windows platform"):
        await facade.open_listener("\\\\.\\pipe\\rpb-v1-0123456789abcdef-shared")


def test_facade_uses_an_installed_transport() -> None:
    fake = FakeWindows()
    facade.set_default_transport(facade.WindowsTransport(fake.api()))
    try:
        assert facade.current_user() == DEFAULT_SID
    finally:
        facade.set_default_transport(None)


def test_every_wrapped_function_has_a_declared_signature() -> None:
    assert set(KERNEL32_SIGNATURES) == _protocol_methods(Kernel32)
    assert set(ADVAPI32_SIGNATURES) == _protocol_methods(Advapi32)
    assert set(NTDLL_SIGNATURES) == _protocol_methods(Ntdll)
    for table in (KERNEL32_SIGNATURES, ADVAPI32_SIGNATURES, NTDLL_SIGNATURES):
        for name, (restype, argtypes) in table.items():
            arity = getattr(Kernel32, name, None) or getattr(Advapi32, name, None)
            arity = arity or getattr(Ntdll, name)
            # self + positional parameters
            assert len(argtypes) == arity.__code__.co_argcount - 1, name
            assert restype is not None, name


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="x64 layouts")
def test_structure_layouts_match_the_64_bit_sdk() -> None:
    assert ctypes.sizeof(OVERLAPPED) == 32
    assert getattr(OVERLAPPED, "Offset").offset == 16  # noqa: B009 - a ctypes field descriptor
    assert getattr(OVERLAPPED, "hEvent").offset == 24  # noqa: B009
    assert ctypes.sizeof(SECURITY_ATTRIBUTES) == 24
    assert ctypes.sizeof(JOBOBJECT_EXTENDED_LIMIT_INFORMATION) == 144
    assert ctypes.sizeof(TOKEN_USER) == 16
    assert ctypes.sizeof(FILE_COMPLETION_INFORMATION) == 16


def test_handle_normalization() -> None:
    assert as_handle(None) == 0
    assert as_handle(-1) == INVALID_HANDLE_VALUE
    assert not is_valid_handle(0)
    assert not is_valid_handle(-1)
    assert not is_valid_handle(INVALID_HANDLE_VALUE)
    assert is_valid_handle(0x104)


def test_failed_call_raises_win32_error_with_function_and_last_error() -> None:
    fake = FakeWindows()
    api = fake.api()
    with pytest.raises(Win32Error) as info:
        api.close_handle(0x999)
    assert info.value.function == "CloseHandle"
    assert info.value.code == ERROR_INVALID_HANDLE
    assert isinstance(info.value, TransportError)
    assert api.close_handle_quietly(0x999) is False


def test_token_user_sid_sizes_then_fills_then_frees_the_string() -> None:
    fake = FakeWindows()
    api = fake.api()
    token = api.open_process_token(api.get_current_process(), TOKEN_QUERY)
    assert api.get_token_user_sid(token) == DEFAULT_SID
    sizing, filling = fake.calls_to("GetTokenInformation")
    assert sizing.args[1] == TOKEN_USER_CLASS and sizing.args[2] is None and sizing.args[3] == 0
    assert filling.args[1] == TOKEN_USER_CLASS
    assert filling.int_arg(3) >= ctypes.sizeof(TOKEN_USER)
    (convert,) = fake.calls_to("ConvertSidToStringSidW")
    assert convert.args[0] == filling.extra["sid_address"]
    # The string Windows allocated was released, and nothing else is outstanding.
    assert fake.calls[-1].name == "LocalFree"
    assert fake.local_allocs == {}


def test_token_user_sid_reports_an_unexpected_sizing_error() -> None:
    fake = FakeWindows()
    api = fake.api()
    token = api.open_process_token(api.get_current_process(), TOKEN_QUERY)
    fake.fail("GetTokenInformation", ERROR_ACCESS_DENIED)
    with pytest.raises(Win32Error) as info:
        api.get_token_user_sid(token)
    assert info.value.code == ERROR_ACCESS_DENIED
    assert info.value.code != ERROR_INSUFFICIENT_BUFFER


def test_remove_completion_port_passes_a_null_port() -> None:
    fake = FakeWindows()
    api = fake.api()
    handle = fake.new_handle("pipe-server", client_pid=1)
    api.remove_completion_port(handle)
    (call,) = fake.calls_to("NtSetInformationFile")
    assert call.args[0] == handle
    assert call.args[3] == ctypes.sizeof(FILE_COMPLETION_INFORMATION)
    assert call.args[4] == FILE_REPLACE_COMPLETION_INFORMATION_CLASS
    assert call.extra["port"] is None
    fake.nt_status_results.append(-1073741811)  # STATUS_INVALID_PARAMETER
    with pytest.raises(Win32Error) as info:
        api.remove_completion_port(handle)
    assert info.value.code == 0xC000000D
