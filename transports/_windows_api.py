"""ctypes declarations of the Win32 calls the Windows transport makes, behind one object.

What this module does: names every Win32 constant, structure and function the
Windows transport uses (kernel32, advapi32 and one ntdll call), declares their
``argtypes``/``restype`` for ``ctypes.WinDLL(..., use_last_error=True)``, and wraps
them in ``Win32Api``: a small object whose methods take and return Python ints and
strings and raise ``Win32Error`` (carrying the function name and
``GetLastError``) when a call fails. Everything else in the transport receives a
``Win32Api`` by injection, so the Linux test-suite builds one over fake DLL objects
(``tests/transports/windows_fakes.py``) and checks call sequences and arguments at the
ctypes level. It also defines ``OverlappedIo``, the four trio IOCP primitives the
transport needs, with the real implementation delegating to ``trio.lowlevel``.

What it does not do: decide anything. Mapping error codes to transport errors,
building security descriptors, pipes, handle passing and job objects live in the
sibling ``_windows_*`` modules. Loading the real DLLs works only on Windows;
``load_win32_api`` raises ``TransportError`` elsewhere. Importing this module never
touches a Windows-only symbol, so it imports on every platform.

Type sizes are spelled out (``DWORD`` is ``c_uint32``) instead of taken from
``ctypes.wintypes``, whose ``DWORD`` is 8 bytes on 64-bit Linux; that keeps the
structure layouts identical on the test platform and on Windows.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Mapping
from typing import Protocol, cast

import trio

from transports._interface import TransportError

# --------------------------------------------------------------------------- types

#: Win32 ``DWORD``/``ULONG``/``UINT``: unsigned 32-bit on every Windows ABI.
DWORD = ctypes.c_uint32
ULONG = ctypes.c_uint32
UINT = ctypes.c_uint32
#: Win32 ``BOOL``: a signed 32-bit int, nonzero for success.
BOOL = ctypes.c_int32
#: ``NTSTATUS``: signed 32-bit; 0 is ``STATUS_SUCCESS``, negative values are errors.
NTSTATUS = ctypes.c_int32
#: ``HANDLE``/``PVOID``/``PSID``/``HLOCAL``: pointer-sized; read back as ``int | None``.
HANDLE = ctypes.c_void_p
LPVOID = ctypes.c_void_p
#: ``ULONG_PTR``/``SIZE_T``: pointer-sized unsigned.
ULONG_PTR = ctypes.c_size_t
SIZE_T = ctypes.c_size_t
#: ``LARGE_INTEGER``/``ULONGLONG``: 64-bit.
LARGE_INTEGER = ctypes.c_int64
ULONGLONG = ctypes.c_uint64

#: Bits in a pointer-sized value (64 on x64/ARM64, 32 on x86).
_POINTER_BITS = 8 * ctypes.sizeof(ctypes.c_void_p)

#: ``INVALID_HANDLE_VALUE`` ((HANDLE)-1) as ctypes returns it for a ``c_void_p``
#: result: unsigned, so 0xFFFFFFFFFFFFFFFF on 64-bit. ``GetCurrentProcess`` returns
#: the same value as its pseudo-handle.
INVALID_HANDLE_VALUE = (1 << _POINTER_BITS) - 1

# ------------------------------------------------------------------- constants
# Values from the Windows SDK headers (winnt.h, winbase.h, winerror.h, sddl.h).

#: CreateNamedPipeW dwOpenMode: read and write on both ends (0x3).
PIPE_ACCESS_DUPLEX = 0x00000003
#: dwOpenMode/dwFlagsAndAttributes: asynchronous I/O, required for trio's IOCP (0x40000000).
FILE_FLAG_OVERLAPPED = 0x40000000
#: dwOpenMode: fail with ERROR_ACCESS_DENIED if the pipe name already exists (0x80000).
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
#: dwPipeMode: byte stream, byte reads, blocking semantics (all 0; named for the record).
PIPE_TYPE_BYTE = 0x00000000
PIPE_READMODE_BYTE = 0x00000000
PIPE_WAIT = 0x00000000
#: dwPipeMode: refuse clients on other machines (SMB) (0x8).
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
#: nMaxInstances: no limit other than system resources (255).
PIPE_UNLIMITED_INSTANCES = 255

#: CreateFileW dwDesiredAccess bits (0x80000000 / 0x40000000).
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
#: CreateFileW dwCreationDisposition: the pipe must already exist (3).
OPEN_EXISTING = 3
#: CreateFileW flags: the next bits carry an impersonation level (0x100000) ...
SECURITY_SQOS_PRESENT = 0x00100000
#: ... and the server may identify but not impersonate the client
#: (SecurityIdentification = 1, shifted left 16: 0x10000).
SECURITY_IDENTIFICATION = 0x00010000

#: OpenProcess access: duplicate handles into the process (0x40).
PROCESS_DUP_HANDLE = 0x0040
#: OpenProcess access: enough to open the token, granted across integrity levels (0x1000).
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
#: OpenProcess access: AssignProcessToJobObject needs SET_QUOTA and TERMINATE (0x100, 0x1).
PROCESS_SET_QUOTA = 0x0100
PROCESS_TERMINATE = 0x0001

#: DuplicateHandle dwOptions (0x1, 0x2). The transport never uses CLOSE_SOURCE.
DUPLICATE_CLOSE_SOURCE = 0x00000001
DUPLICATE_SAME_ACCESS = 0x00000002

#: OpenProcessToken access: read the token (0x8).
TOKEN_QUERY = 0x0008
#: TOKEN_INFORMATION_CLASS.TokenUser (1).
TOKEN_USER_CLASS = 1

#: JOBOBJECTINFOCLASS.JobObjectExtendedLimitInformation (9).
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
#: LimitFlags bit: closing the last job handle terminates every process in the job (0x2000).
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000

#: Process creation flag: the child leads a new console process group, so
#: CTRL_BREAK_EVENT can target it without reaching the broker (0x200).
CREATE_NEW_PROCESS_GROUP = 0x00000200
#: GenerateConsoleCtrlEvent event id for Ctrl+Break (1).
CTRL_BREAK_EVENT = 1

#: SetHandleInformation mask/flag: the handle is inherited by child processes (0x1).
HANDLE_FLAG_INHERIT = 0x00000001

#: ConvertStringSecurityDescriptorToSecurityDescriptorW revision (1).
SDDL_REVISION_1 = 1

#: FILE_INFORMATION_CLASS.FileReplaceCompletionInformation (61, Windows 8.1+): with a
#: NULL port it removes a file object's I/O completion port association.
FILE_REPLACE_COMPLETION_INFORMATION_CLASS = 61

#: stat ``st_file_attributes`` bit of a reparse point (junction, symlink) (0x400).
FILE_ATTRIBUTE_REPARSE_POINT = 0x00000400

#: Exit status a console process gets when killed by Ctrl+C/Ctrl+Break (0xC000013A).
STATUS_CONTROL_C_EXIT = 0xC000013A

# Win32 error codes (winerror.h).
ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_TOO_MANY_OPEN_FILES = 4
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_OUTOFMEMORY = 14
ERROR_INVALID_PARAMETER = 87
ERROR_BROKEN_PIPE = 109
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_BAD_PATHNAME = 161
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
ERROR_NO_SYSTEM_RESOURCES = 1450


# ------------------------------------------------------------------ structures


class SECURITY_ATTRIBUTES(ctypes.Structure):
    """``SECURITY_ATTRIBUTES``: a security descriptor and handle inheritance."""

    nLength: int
    lpSecurityDescriptor: int | None
    bInheritHandle: int
    _fields_ = (
        ("nLength", DWORD),
        ("lpSecurityDescriptor", LPVOID),
        ("bInheritHandle", BOOL),
    )


class OVERLAPPED(ctypes.Structure):
    """``OVERLAPPED`` with its offset union flattened (same size and offsets).

    trio reads ``Internal`` (an NTSTATUS) through its own cffi view of the struct
    when the completion arrives, so the layout must match the SDK's exactly.
    """

    Internal: int
    InternalHigh: int
    Offset: int
    OffsetHigh: int
    hEvent: int | None
    _fields_ = (
        ("Internal", ULONG_PTR),
        ("InternalHigh", ULONG_PTR),
        ("Offset", DWORD),
        ("OffsetHigh", DWORD),
        ("hEvent", HANDLE),
    )


class JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):
    """``JOBOBJECT_BASIC_LIMIT_INFORMATION``."""

    LimitFlags: int
    _fields_ = (
        ("PerProcessUserTimeLimit", LARGE_INTEGER),
        ("PerJobUserTimeLimit", LARGE_INTEGER),
        ("LimitFlags", DWORD),
        ("MinimumWorkingSetSize", SIZE_T),
        ("MaximumWorkingSetSize", SIZE_T),
        ("ActiveProcessLimit", DWORD),
        ("Affinity", ULONG_PTR),
        ("PriorityClass", DWORD),
        ("SchedulingClass", DWORD),
    )


class IO_COUNTERS(ctypes.Structure):
    """``IO_COUNTERS`` (only here to give the extended limit struct its size)."""

    _fields_ = (
        ("ReadOperationCount", ULONGLONG),
        ("WriteOperationCount", ULONGLONG),
        ("OtherOperationCount", ULONGLONG),
        ("ReadTransferCount", ULONGLONG),
        ("WriteTransferCount", ULONGLONG),
        ("OtherTransferCount", ULONGLONG),
    )


class JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):
    """``JOBOBJECT_EXTENDED_LIMIT_INFORMATION`` (144 bytes on 64-bit Windows)."""

    BasicLimitInformation: JOBOBJECT_BASIC_LIMIT_INFORMATION
    _fields_ = (
        ("BasicLimitInformation", JOBOBJECT_BASIC_LIMIT_INFORMATION),
        ("IoInfo", IO_COUNTERS),
        ("ProcessMemoryLimit", SIZE_T),
        ("JobMemoryLimit", SIZE_T),
        ("PeakProcessMemoryUsed", SIZE_T),
        ("PeakJobMemoryUsed", SIZE_T),
    )


class SID_AND_ATTRIBUTES(ctypes.Structure):
    """``SID_AND_ATTRIBUTES``: a pointer to a SID and its attribute bits."""

    Sid: int | None
    Attributes: int
    _fields_ = (("Sid", LPVOID), ("Attributes", DWORD))


class TOKEN_USER(ctypes.Structure):
    """``TOKEN_USER``: the head of GetTokenInformation(TokenUser)'s buffer."""

    User: SID_AND_ATTRIBUTES
    _fields_ = (("User", SID_AND_ATTRIBUTES),)


class IO_STATUS_BLOCK(ctypes.Structure):
    """``IO_STATUS_BLOCK`` (the Status/Pointer union is pointer-sized)."""

    _fields_ = (("Status", ULONG_PTR), ("Information", ULONG_PTR))


class FILE_COMPLETION_INFORMATION(ctypes.Structure):
    """``FILE_COMPLETION_INFORMATION``: the completion port and key of a file object."""

    Port: int | None
    Key: int | None
    _fields_ = (("Port", HANDLE), ("Key", LPVOID))


# -------------------------------------------------------------- raw DLL shapes


class Kernel32(Protocol):
    """The kernel32 functions the transport calls, as ctypes exposes them."""

    def CreateNamedPipeW(
        self,
        lpName: str,
        dwOpenMode: int,
        dwPipeMode: int,
        nMaxInstances: int,
        nOutBufferSize: int,
        nInBufferSize: int,
        nDefaultTimeOut: int,
        lpSecurityAttributes: object,
        /,
    ) -> int | None: ...

    def ConnectNamedPipe(self, hNamedPipe: int, lpOverlapped: object, /) -> int: ...

    def CreateFileW(
        self,
        lpFileName: str,
        dwDesiredAccess: int,
        dwShareMode: int,
        lpSecurityAttributes: object,
        dwCreationDisposition: int,
        dwFlagsAndAttributes: int,
        hTemplateFile: int | None,
        /,
    ) -> int | None: ...

    def GetNamedPipeClientProcessId(self, Pipe: int, ClientProcessId: object, /) -> int: ...

    def GetNamedPipeServerProcessId(self, Pipe: int, ServerProcessId: object, /) -> int: ...

    def OpenProcess(
        self, dwDesiredAccess: int, bInheritHandle: int, dwProcessId: int, /
    ) -> int | None: ...

    def DuplicateHandle(
        self,
        hSourceProcessHandle: int,
        hSourceHandle: int,
        hTargetProcessHandle: int,
        lpTargetHandle: object,
        dwDesiredAccess: int,
        bInheritHandle: int,
        dwOptions: int,
        /,
    ) -> int: ...

    def CloseHandle(self, hObject: int, /) -> int: ...

    def GetCurrentProcess(self) -> int | None: ...

    def CreateJobObjectW(self, lpJobAttributes: object, lpName: str | None, /) -> int | None: ...

    def SetInformationJobObject(
        self,
        hJob: int,
        JobObjectInformationClass: int,
        lpJobObjectInformation: object,
        cbJobObjectInformationLength: int,
        /,
    ) -> int: ...

    def AssignProcessToJobObject(self, hJob: int, hProcess: int, /) -> int: ...

    def TerminateJobObject(self, hJob: int, uExitCode: int, /) -> int: ...

    def CancelIoEx(self, hFile: int, lpOverlapped: object, /) -> int: ...

    def SetHandleInformation(self, hObject: int, dwMask: int, dwFlags: int, /) -> int: ...

    def LocalFree(self, hMem: int, /) -> int | None: ...


class Advapi32(Protocol):
    """The advapi32 functions the transport calls, as ctypes exposes them."""

    def OpenProcessToken(
        self, ProcessHandle: int, DesiredAccess: int, TokenHandle: object, /
    ) -> int: ...

    def GetTokenInformation(
        self,
        TokenHandle: int,
        TokenInformationClass: int,
        TokenInformation: object,
        TokenInformationLength: int,
        ReturnLength: object,
        /,
    ) -> int: ...

    def ConvertSidToStringSidW(self, Sid: int, StringSid: object, /) -> int: ...

    def ConvertStringSecurityDescriptorToSecurityDescriptorW(
        self,
        StringSecurityDescriptor: str,
        StringSDRevision: int,
        SecurityDescriptor: object,
        SecurityDescriptorSize: object,
        /,
    ) -> int: ...


class Ntdll(Protocol):
    """The one ntdll function the transport calls (it returns an NTSTATUS)."""

    def NtSetInformationFile(
        self,
        FileHandle: int,
        IoStatusBlock: object,
        FileInformation: object,
        Length: int,
        FileInformationClass: int,
        /,
    ) -> int: ...


_Signature = tuple[object, tuple[object, ...]]

_P_DWORD = ctypes.POINTER(DWORD)
_P_HANDLE = ctypes.POINTER(HANDLE)
_P_LPVOID = ctypes.POINTER(LPVOID)

#: restype and argtypes of every kernel32 function in ``Kernel32``.
KERNEL32_SIGNATURES: Mapping[str, _Signature] = {
    "CreateNamedPipeW": (
        HANDLE,
        (ctypes.c_wchar_p, DWORD, DWORD, DWORD, DWORD, DWORD, DWORD, LPVOID),
    ),
    "ConnectNamedPipe": (BOOL, (HANDLE, LPVOID)),
    "CreateFileW": (HANDLE, (ctypes.c_wchar_p, DWORD, DWORD, LPVOID, DWORD, DWORD, HANDLE)),
    "GetNamedPipeClientProcessId": (BOOL, (HANDLE, _P_DWORD)),
    "GetNamedPipeServerProcessId": (BOOL, (HANDLE, _P_DWORD)),
    "OpenProcess": (HANDLE, (DWORD, BOOL, DWORD)),
    "DuplicateHandle": (BOOL, (HANDLE, HANDLE, HANDLE, _P_HANDLE, DWORD, BOOL, DWORD)),
    "CloseHandle": (BOOL, (HANDLE,)),
    "GetCurrentProcess": (HANDLE, ()),
    "CreateJobObjectW": (HANDLE, (LPVOID, ctypes.c_wchar_p)),
    "SetInformationJobObject": (BOOL, (HANDLE, ctypes.c_int, LPVOID, DWORD)),
    "AssignProcessToJobObject": (BOOL, (HANDLE, HANDLE)),
    "TerminateJobObject": (BOOL, (HANDLE, UINT)),
    "CancelIoEx": (BOOL, (HANDLE, LPVOID)),
    "SetHandleInformation": (BOOL, (HANDLE, DWORD, DWORD)),
    "LocalFree": (LPVOID, (LPVOID,)),
}

#: restype and argtypes of every advapi32 function in ``Advapi32``.
ADVAPI32_SIGNATURES: Mapping[str, _Signature] = {
    "OpenProcessToken": (BOOL, (HANDLE, DWORD, _P_HANDLE)),
    "GetTokenInformation": (BOOL, (HANDLE, ctypes.c_int, LPVOID, DWORD, _P_DWORD)),
    # The out-parameter is an LPWSTR*; declaring it as void** lets us read the
    # address, copy the string out and LocalFree exactly that address.
    "ConvertSidToStringSidW": (BOOL, (LPVOID, _P_LPVOID)),
    "ConvertStringSecurityDescriptorToSecurityDescriptorW": (
        BOOL,
        (ctypes.c_wchar_p, DWORD, _P_LPVOID, _P_DWORD),
    ),
}

#: restype and argtypes of the ntdll function in ``Ntdll``.
NTDLL_SIGNATURES: Mapping[str, _Signature] = {
    "NtSetInformationFile": (NTSTATUS, (HANDLE, LPVOID, LPVOID, ULONG, ctypes.c_int)),
}


class Win32Error(TransportError):
    """A Win32 call failed; ``code`` is its ``GetLastError`` value (or NTSTATUS for ntdll)."""

    def __init__(self, function: str, code: int) -> None:
        super().__init__(f"{function} failed with Windows error {code}")
        self.function = function
        self.code = code


def as_handle(value: int | None) -> int:
    """Normalize a pointer-sized result: ``None`` (NULL) becomes 0, -1 becomes unsigned."""
    if value is None:
        return 0
    return value & INVALID_HANDLE_VALUE


def is_valid_handle(value: int) -> bool:
    """False for NULL and ``INVALID_HANDLE_VALUE``, the two failure values of HANDLE APIs."""
    return as_handle(value) not in (0, INVALID_HANDLE_VALUE)


class Win32Api:
    """The Win32 calls of the transport with Python types and ``Win32Error`` on failure.

    Handles are plain ints. Methods raise ``Win32Error`` with the function name and
    the thread's last error right after a failing call; they never close anything
    they did not allocate themselves. Memory Windows allocates for a result (a SID
    string) is copied out and ``LocalFree``'d before returning; a security
    descriptor is returned as an address the caller must ``local_free``.
    """

    def __init__(
        self,
        kernel32: Kernel32,
        advapi32: Advapi32,
        ntdll: Ntdll,
        get_last_error: Callable[[], int],
    ) -> None:
        self._k = kernel32
        self._a = advapi32
        self._n = ntdll
        self._last_error = get_last_error

    def _fail(self, function: str) -> Win32Error:
        return Win32Error(function, self._last_error())

    # -- pipes

    def create_named_pipe(
        self,
        name: str,
        open_mode: int,
        pipe_mode: int,
        max_instances: int,
        out_buffer_size: int,
        in_buffer_size: int,
        default_timeout_ms: int,
        security_descriptor: int,
    ) -> int:
        """CreateNamedPipeW with a non-inheritable SECURITY_ATTRIBUTES around the descriptor."""
        attributes = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), security_descriptor, 0)
        handle = as_handle(
            self._k.CreateNamedPipeW(
                name,
                open_mode,
                pipe_mode,
                max_instances,
                out_buffer_size,
                in_buffer_size,
                default_timeout_ms,
                ctypes.pointer(attributes),
            )
        )
        if not is_valid_handle(handle):
            raise self._fail("CreateNamedPipeW")
        return handle

    def connect_named_pipe(self, handle: int, overlapped: OVERLAPPED) -> bool:
        """ConnectNamedPipe in overlapped mode.

        Returns True when the call returned nonzero (a completion packet will still
        be queued for an IOCP-registered handle). Raises ``Win32Error`` otherwise,
        including for the non-errors ERROR_IO_PENDING and ERROR_PIPE_CONNECTED, which
        the caller interprets.
        """
        if not self._k.ConnectNamedPipe(handle, ctypes.pointer(overlapped)):
            raise self._fail("ConnectNamedPipe")
        return True

    def create_file(
        self,
        name: str,
        desired_access: int,
        share_mode: int,
        creation_disposition: int,
        flags_and_attributes: int,
    ) -> int:
        """CreateFileW with no security attributes and no template file."""
        handle = as_handle(
            self._k.CreateFileW(
                name,
                desired_access,
                share_mode,
                None,
                creation_disposition,
                flags_and_attributes,
                None,
            )
        )
        if not is_valid_handle(handle):
            raise self._fail("CreateFileW")
        return handle

    def get_named_pipe_client_process_id(self, handle: int) -> int:
        """GetNamedPipeClientProcessId: the pid of the process that opened the client end."""
        pid = DWORD(0)
        if not self._k.GetNamedPipeClientProcessId(handle, ctypes.pointer(pid)):
            raise self._fail("GetNamedPipeClientProcessId")
        return int(pid.value)

    def get_named_pipe_server_process_id(self, handle: int) -> int:
        """GetNamedPipeServerProcessId: the pid of the process that created the instance."""
        pid = DWORD(0)
        if not self._k.GetNamedPipeServerProcessId(handle, ctypes.pointer(pid)):
            raise self._fail("GetNamedPipeServerProcessId")
        return int(pid.value)

    def cancel_io_ex(self, handle: int, overlapped: OVERLAPPED) -> None:
        """CancelIoEx for one OVERLAPPED."""
        if not self._k.CancelIoEx(handle, ctypes.pointer(overlapped)):
            raise self._fail("CancelIoEx")

    # -- processes and handles

    def get_current_process(self) -> int:
        """GetCurrentProcess: the pseudo-handle (never needs closing)."""
        return as_handle(self._k.GetCurrentProcess())

    def open_process(self, desired_access: int, inherit: bool, pid: int) -> int:
        """OpenProcess; the caller closes the returned handle."""
        handle = as_handle(self._k.OpenProcess(desired_access, int(inherit), pid))
        if handle == 0:
            raise self._fail("OpenProcess")
        return handle

    def duplicate_handle(
        self,
        source_process: int,
        source_handle: int,
        target_process: int,
        desired_access: int,
        inherit: bool,
        options: int,
    ) -> int:
        """DuplicateHandle; returns the new value *as it is in the target process*.

        A successful call that nevertheless produced NULL or INVALID_HANDLE_VALUE
        returns that value; judging it is the caller's job.
        """
        target = HANDLE(0)
        ok = self._k.DuplicateHandle(
            source_process,
            source_handle,
            target_process,
            ctypes.pointer(target),
            desired_access,
            int(inherit),
            options,
        )
        if not ok:
            raise self._fail("DuplicateHandle")
        return as_handle(target.value)

    def close_handle(self, handle: int) -> None:
        """CloseHandle."""
        if not self._k.CloseHandle(handle):
            raise self._fail("CloseHandle")

    def close_handle_quietly(self, handle: int) -> bool:
        """CloseHandle for cleanup paths: returns False instead of raising on failure."""
        return bool(self._k.CloseHandle(handle))

    def set_handle_inheritable(self, handle: int, inheritable: bool) -> None:
        """SetHandleInformation(HANDLE_FLAG_INHERIT)."""
        flags = HANDLE_FLAG_INHERIT if inheritable else 0
        if not self._k.SetHandleInformation(handle, HANDLE_FLAG_INHERIT, flags):
            raise self._fail("SetHandleInformation")

    # -- job objects

    def create_job_object(self) -> int:
        """CreateJobObjectW: an unnamed job with default security."""
        handle = as_handle(self._k.CreateJobObjectW(None, None))
        if handle == 0:
            raise self._fail("CreateJobObjectW")
        return handle

    def set_information_job_object(self, job: int, info_class: int, info: ctypes.Structure) -> None:
        """SetInformationJobObject with a pointer to ``info`` and its size."""
        if not self._k.SetInformationJobObject(
            job, info_class, ctypes.pointer(info), ctypes.sizeof(info)
        ):
            raise self._fail("SetInformationJobObject")

    def assign_process_to_job_object(self, job: int, process: int) -> None:
        """AssignProcessToJobObject."""
        if not self._k.AssignProcessToJobObject(job, process):
            raise self._fail("AssignProcessToJobObject")

    def terminate_job_object(self, job: int, exit_code: int) -> None:
        """TerminateJobObject: every process in the job exits with ``exit_code``."""
        if not self._k.TerminateJobObject(job, exit_code):
            raise self._fail("TerminateJobObject")

    # -- security

    def local_free(self, address: int) -> None:
        """LocalFree (it returns NULL on success)."""
        if self._k.LocalFree(address):
            raise self._fail("LocalFree")

    def open_process_token(self, process: int, desired_access: int) -> int:
        """OpenProcessToken; the caller closes the returned handle."""
        token = HANDLE(0)
        if not self._a.OpenProcessToken(process, desired_access, ctypes.pointer(token)):
            raise self._fail("OpenProcessToken")
        return as_handle(token.value)

    def get_token_user_sid(self, token: int) -> str:
        """The token's user SID as a string (``S-1-5-21-...``).

        GetTokenInformation(TokenUser) is called once to learn the size and once to
        fill the buffer; the SID is converted with ConvertSidToStringSidW and the
        string Windows allocated is released with LocalFree.
        """
        needed = DWORD(0)
        if self._a.GetTokenInformation(token, TOKEN_USER_CLASS, None, 0, ctypes.pointer(needed)):
            raise Win32Error("GetTokenInformation", ERROR_INSUFFICIENT_BUFFER)
        code = self._last_error()
        if code != ERROR_INSUFFICIENT_BUFFER:
            raise Win32Error("GetTokenInformation", code)
        size = max(int(needed.value), ctypes.sizeof(TOKEN_USER))
        buffer = ctypes.create_string_buffer(size)
        if not self._a.GetTokenInformation(
            token, TOKEN_USER_CLASS, buffer, size, ctypes.pointer(needed)
        ):
            raise self._fail("GetTokenInformation")
        sid = TOKEN_USER.from_buffer(buffer).User.Sid
        if not sid:
            raise Win32Error("GetTokenInformation", ERROR_INVALID_PARAMETER)
        return self.sid_to_string(sid)

    def sid_to_string(self, sid: int) -> str:
        """ConvertSidToStringSidW, copying the string out and LocalFree'ing Windows' copy."""
        text = LPVOID(0)
        if not self._a.ConvertSidToStringSidW(sid, ctypes.pointer(text)):
            raise self._fail("ConvertSidToStringSidW")
        address = text.value
        if not address:
            raise Win32Error("ConvertSidToStringSidW", ERROR_INVALID_PARAMETER)
        try:
            return ctypes.wstring_at(address)
        finally:
            self.local_free(address)

    def security_descriptor_from_sddl(self, sddl: str) -> int:
        """ConvertStringSecurityDescriptorToSecurityDescriptorW; free the result with local_free."""
        descriptor = LPVOID(0)
        if not self._a.ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl, SDDL_REVISION_1, ctypes.pointer(descriptor), None
        ):
            raise self._fail("ConvertStringSecurityDescriptorToSecurityDescriptorW")
        address = descriptor.value
        if not address:
            raise Win32Error(
                "ConvertStringSecurityDescriptorToSecurityDescriptorW", ERROR_INVALID_PARAMETER
            )
        return address

    # -- completion ports

    def remove_completion_port(self, handle: int) -> None:
        """Detach the file object behind ``handle`` from any I/O completion port.

        NtSetInformationFile(FileReplaceCompletionInformation) with a NULL port
        (Windows 8.1+). A handle duplicated from a process that registered it with
        its own IOCP must be detached before ``register_with_iocp`` can succeed here;
        it fails while I/O is pending on the file object. ``Win32Error.code`` is the
        NTSTATUS for this one.
        """
        status_block = IO_STATUS_BLOCK()
        info = FILE_COMPLETION_INFORMATION(None, None)
        status = self._n.NtSetInformationFile(
            handle,
            ctypes.pointer(status_block),
            ctypes.pointer(info),
            ctypes.sizeof(info),
            FILE_REPLACE_COMPLETION_INFORMATION_CLASS,
        )
        if status != 0:
            raise Win32Error("NtSetInformationFile", status & 0xFFFFFFFF)


def _declare(dll: object, signatures: Mapping[str, _Signature]) -> None:
    for name, (restype, argtypes) in signatures.items():
        function = getattr(dll, name)
        function.restype = restype
        function.argtypes = argtypes


def load_win32_api() -> Win32Api:
    """Load kernel32, advapi32 and ntdll with ``use_last_error=True`` and declared signatures.

    Raises ``TransportError`` on a non-Windows platform.
    """
    if sys.platform != "win32":
        raise TransportError("Windows transport used on a non-Windows platform")
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    ntdll = ctypes.WinDLL("ntdll")
    _declare(kernel32, KERNEL32_SIGNATURES)
    _declare(advapi32, ADVAPI32_SIGNATURES)
    _declare(ntdll, NTDLL_SIGNATURES)
    return Win32Api(
        cast(Kernel32, kernel32),
        cast(Advapi32, advapi32),
        cast(Ntdll, ntdll),
        ctypes.get_last_error,
    )


# ----------------------------------------------------------------- trio's IOCP


class OverlappedIo(Protocol):
    """The trio IOCP primitives the transport uses, so tests can replace them.

    Errors surface as ``OSError`` whose ``winerror`` attribute is the Win32 code
    (read it with ``winerror_of``; the attribute exists only on Windows).
    """

    def register(self, handle: int) -> None:
        """Associate ``handle`` with trio's completion port (once per file object)."""
        ...

    async def readinto(self, handle: int, buffer: bytearray) -> int:
        """ReadFile into ``buffer``; returns the byte count. Cancellable (CancelIoEx)."""
        ...

    async def write(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        """WriteFile all of ``data``; returns the byte count. Cancellable (CancelIoEx)."""
        ...

    async def wait(self, handle: int, overlapped: OVERLAPPED) -> None:
        """Wait for the completion of an operation already started with ``overlapped``.

        Cancellation issues CancelIoEx and still waits for the completion packet, so
        ``overlapped`` stays referenced until the kernel is done with it.
        """
        ...


class TrioOverlappedIo:
    """``OverlappedIo`` over ``trio.lowlevel`` (Windows only; raises elsewhere)."""

    def register(self, handle: int) -> None:
        if sys.platform != "win32":
            raise TransportError("Windows transport used on a non-Windows platform")
        trio.lowlevel.register_with_iocp(handle)

    async def readinto(self, handle: int, buffer: bytearray) -> int:
        if sys.platform != "win32":
            raise TransportError("Windows transport used on a non-Windows platform")
        return await trio.lowlevel.readinto_overlapped(handle, buffer)

    async def write(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        if sys.platform != "win32":
            raise TransportError("Windows transport used on a non-Windows platform")
        return await trio.lowlevel.write_overlapped(handle, data)

    async def wait(self, handle: int, overlapped: OVERLAPPED) -> None:
        if sys.platform != "win32":
            raise TransportError("Windows transport used on a non-Windows platform")
        await trio.lowlevel.wait_overlapped(handle, ctypes.addressof(overlapped))


def winerror_of(exc: BaseException) -> int | None:
    """The Win32 error code of an ``OSError`` raised by trio's IOCP calls, if any."""
    code = getattr(exc, "winerror", None)
    return code if isinstance(code, int) else None
