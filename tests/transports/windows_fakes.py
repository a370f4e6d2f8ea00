"""Test doubles for the Windows transport: fake kernel32/advapi32/ntdll, IOCP and Popen.

What this module does: ``FakeWindows`` simulates just enough of Windows for the
transport's logic to run on any platform: a handle table, processes with SIDs,
named pipes with instances and clients, job objects, and ``LocalAlloc``'d memory.
Its ``kernel32``, ``advapi32`` and ``ntdll`` attributes take the same ctypes-level
arguments as the real DLL functions (strings, ints, ``ctypes.pointer`` out
parameters and structures), so ``Win32Api`` itself runs unmodified over them.
Every call is recorded in order with its arguments (and what the fake decoded
from pointer arguments); failures are injected per function with ``fail``.
``FakeIo`` stands in for trio's overlapped primitives and ``FakePopenFactory``
for ``subprocess.Popen``.

What it does not do: emulate Windows faithfully. Only the behaviour the transport
relies on is modelled (for example ConnectNamedPipe completes when the test says
so, not when a client connects), and nothing here is used outside tests, which is
why it lives in the test tree and is not installed with ``transports``.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from transports._windows_api import (
    ERROR_ACCESS_DENIED,
    ERROR_FILE_NOT_FOUND,
    ERROR_INSUFFICIENT_BUFFER,
    ERROR_INVALID_HANDLE,
    ERROR_INVALID_PARAMETER,
    ERROR_IO_PENDING,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED,
    ERROR_PIPE_NOT_CONNECTED,
    FILE_COMPLETION_INFORMATION,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    INVALID_HANDLE_VALUE,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    OVERLAPPED,
    SECURITY_ATTRIBUTES,
    TOKEN_USER,
    Win32Api,
)

#: A typical SID of a local user account, used as the current user by default.
DEFAULT_SID = "S-1-5-21-1004336348-1177238915-682003330-1001"

#: Pid of the simulated current process.
DEFAULT_PID = 4100

#: Size in bytes of the simulated binary SID that follows TOKEN_USER.
_SID_BYTES = 28


@dataclass
class Call:
    """One recorded call: the DLL, the function, its raw arguments, what was decoded."""

    dll: str
    name: str
    args: tuple[object, ...]
    extra: dict[str, object] = field(default_factory=dict)

    def int_arg(self, index: int) -> int:
        """Argument ``index``, which must be an int (a handle, flag or size)."""
        value = self.args[index]
        assert isinstance(value, int), f"{self.name} argument {index} is {value!r}"
        return value


@dataclass
class FakeHandle:
    """What a simulated handle refers to."""

    kind: str
    pid: int = 0
    name: str = ""
    client_pid: int | None = None
    server_pid: int | None = None
    inheritable: bool = False
    open_mode: int = 0
    max_instances: int = 0
    sddl: str | None = None
    limit_flags: int | None = None
    members: list[int] = field(default_factory=list)
    terminated_with: list[int] = field(default_factory=list)


def _contents(pointer: object) -> Any:
    """The object a ``ctypes.pointer`` argument points to."""
    assert isinstance(pointer, ctypes._Pointer), f"expected a ctypes pointer, got {pointer!r}"
    return pointer.contents


class FakeWindows:
    """A recording simulation of the Win32 calls the transport makes."""

    def __init__(self, *, pid: int = DEFAULT_PID, sid: str = DEFAULT_SID) -> None:
        self.pid = pid
        self.sid = sid
        self.calls: list[Call] = []
        self.last_error = 0
        self.handles: dict[int, FakeHandle] = {}
        self.closed: list[int] = []
        self.processes: dict[int, str] = {pid: sid}
        self.pipes: dict[str, list[int]] = {}
        self.foreign_pipes: set[str] = set()
        self.busy: dict[str, int] = {}
        self.local_allocs: dict[int, tuple[str, object, object]] = {}
        self.freed: list[int] = []
        self.sid_blobs: dict[int, str] = {}
        self.connect_results: list[int] = []
        self.duplicate_results: list[int | None] = []
        self.nt_status_results: list[int] = []
        self._failures: dict[str, list[int]] = {}
        self._keepalive: list[object] = []
        self._handle_values = itertools.count(0x100, 4)
        self._remote_values = itertools.count(0x2000, 4)
        self.kernel32 = FakeKernel32(self)
        self.advapi32 = FakeAdvapi32(self)
        self.ntdll = FakeNtdll(self)

    # -- test controls

    def api(self) -> Win32Api:
        """A real ``Win32Api`` over these fake DLLs."""
        return Win32Api(self.kernel32, self.advapi32, self.ntdll, self.get_last_error)

    def get_last_error(self) -> int:
        return self.last_error

    def fail(self, function: str, code: int, times: int = 1) -> None:
        """Make the next ``times`` calls of ``function`` fail with error ``code``."""
        self._failures.setdefault(function, []).extend([code] * times)

    def add_process(self, pid: int, sid: str) -> None:
        self.processes[pid] = sid

    def new_handle(self, kind: str, **details: Any) -> int:
        """Put a handle of ``kind`` in the table (for handles the test pretends exist)."""
        value = next(self._handle_values)
        self.handles[value] = FakeHandle(kind=kind, **details)
        return value

    def names(self) -> list[str]:
        """The function names called so far, in order."""
        return [call.name for call in self.calls]

    def calls_to(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.name == name]

    def open_handles(self, kind: str | None = None) -> list[int]:
        return [h for h, info in self.handles.items() if kind is None or info.kind == kind]

    # -- helpers for the fake DLLs

    def _enter(self, dll: str, name: str, args: tuple[object, ...]) -> tuple[Call, int]:
        call = Call(dll, name, args)
        self.calls.append(call)
        queue = self._failures.get(name)
        if queue:
            code = queue.pop(0)
            self.last_error = code
            return call, code
        return call, 0

    def _error(self, code: int) -> None:
        self.last_error = code

    def _alloc(self, kind: str, payload: object, keepalive: ctypes.Array[Any]) -> int:
        address = ctypes.addressof(keepalive)
        self.local_allocs[address] = (kind, payload, keepalive)
        return address

    def _process_of(self, handle: int) -> int | None:
        if handle == INVALID_HANDLE_VALUE:
            return self.pid
        info = self.handles.get(handle)
        if info is None or info.kind != "process":
            return None
        return info.pid


class FakeKernel32:
    """kernel32 as the transport calls it (see ``transports._windows_api.Kernel32``)."""

    def __init__(self, fake: FakeWindows) -> None:
        self._w = fake

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
    ) -> int | None:
        w = self._w
        call, code = w._enter(
            "kernel32",
            "CreateNamedPipeW",
            (
                lpName,
                dwOpenMode,
                dwPipeMode,
                nMaxInstances,
                nOutBufferSize,
                nInBufferSize,
                nDefaultTimeOut,
                lpSecurityAttributes,
            ),
        )
        attributes = _contents(lpSecurityAttributes)
        assert isinstance(attributes, SECURITY_ATTRIBUTES)
        descriptor = attributes.lpSecurityDescriptor
        allocation = w.local_allocs.get(descriptor or 0)
        call.extra["descriptor_live"] = allocation is not None and allocation[0] == "sd"
        call.extra["sddl"] = allocation[1] if allocation is not None else None
        call.extra["inherit"] = attributes.bInheritHandle
        call.extra["nLength"] = attributes.nLength
        if code:
            return INVALID_HANDLE_VALUE
        instances = w.pipes.get(lpName, [])
        exists = bool(instances) or lpName in w.foreign_pipes
        if dwOpenMode & FILE_FLAG_FIRST_PIPE_INSTANCE and exists:
            w._error(ERROR_ACCESS_DENIED)
            return INVALID_HANDLE_VALUE
        if instances and len(instances) >= w.handles[instances[0]].max_instances:
            w._error(ERROR_PIPE_BUSY)
            return INVALID_HANDLE_VALUE
        handle = w.new_handle(
            "pipe-server",
            name=lpName,
            server_pid=w.pid,
            open_mode=dwOpenMode,
            max_instances=nMaxInstances,
            sddl=call.extra["sddl"] if isinstance(call.extra["sddl"], str) else None,
        )
        w.pipes.setdefault(lpName, []).append(handle)
        return handle

    def ConnectNamedPipe(self, hNamedPipe: int, lpOverlapped: object, /) -> int:
        w = self._w
        call, code = w._enter("kernel32", "ConnectNamedPipe", (hNamedPipe, lpOverlapped))
        overlapped = _contents(lpOverlapped)
        assert isinstance(overlapped, OVERLAPPED)
        call.extra["overlapped_address"] = ctypes.addressof(overlapped)
        if code:
            return 0
        info = w.handles.get(hNamedPipe)
        if info is None or info.kind != "pipe-server":
            w._error(ERROR_INVALID_HANDLE)
            return 0
        if info.client_pid is not None:
            w._error(ERROR_PIPE_CONNECTED)
            return 0
        result = w.connect_results.pop(0) if w.connect_results else ERROR_IO_PENDING
        if result == 0:
            return 1
        w._error(result)
        return 0

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
    ) -> int | None:
        w = self._w
        _, code = w._enter(
            "kernel32",
            "CreateFileW",
            (
                lpFileName,
                dwDesiredAccess,
                dwShareMode,
                lpSecurityAttributes,
                dwCreationDisposition,
                dwFlagsAndAttributes,
                hTemplateFile,
            ),
        )
        if code:
            return INVALID_HANDLE_VALUE
        if w.busy.get(lpFileName, 0) > 0:
            w.busy[lpFileName] -= 1
            w._error(ERROR_PIPE_BUSY)
            return INVALID_HANDLE_VALUE
        instances = w.pipes.get(lpFileName)
        if not instances:
            w._error(ERROR_FILE_NOT_FOUND)
            return INVALID_HANDLE_VALUE
        for server in instances:
            info = w.handles[server]
            if info.client_pid is None:
                info.client_pid = w.pid
                return w.new_handle(
                    "pipe-client", name=lpFileName, server_pid=info.server_pid or w.pid
                )
        w._error(ERROR_PIPE_BUSY)
        return INVALID_HANDLE_VALUE

    def GetNamedPipeClientProcessId(self, Pipe: int, ClientProcessId: object, /) -> int:
        w = self._w
        _, code = w._enter("kernel32", "GetNamedPipeClientProcessId", (Pipe, ClientProcessId))
        if code:
            return 0
        info = w.handles.get(Pipe)
        if info is None:
            w._error(ERROR_INVALID_HANDLE)
            return 0
        if info.client_pid is None:
            w._error(ERROR_PIPE_NOT_CONNECTED)
            return 0
        _contents(ClientProcessId).value = info.client_pid
        return 1

    def GetNamedPipeServerProcessId(self, Pipe: int, ServerProcessId: object, /) -> int:
        w = self._w
        _, code = w._enter("kernel32", "GetNamedPipeServerProcessId", (Pipe, ServerProcessId))
        if code:
            return 0
        info = w.handles.get(Pipe)
        if info is None or info.server_pid is None:
            w._error(ERROR_INVALID_HANDLE)
            return 0
        _contents(ServerProcessId).value = info.server_pid
        return 1

    def OpenProcess(
        self, dwDesiredAccess: int, bInheritHandle: int, dwProcessId: int, /
    ) -> int | None:
        w = self._w
        call, code = w._enter(
            "kernel32", "OpenProcess", (dwDesiredAccess, bInheritHandle, dwProcessId)
        )
        if code:
            return None
        if dwProcessId not in w.processes:
            w._error(ERROR_INVALID_PARAMETER)
            return None
        handle = w.new_handle("process", pid=dwProcessId)
        call.extra["handle"] = handle
        return handle

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
    ) -> int:
        w = self._w
        _, code = w._enter(
            "kernel32",
            "DuplicateHandle",
            (
                hSourceProcessHandle,
                hSourceHandle,
                hTargetProcessHandle,
                lpTargetHandle,
                dwDesiredAccess,
                bInheritHandle,
                dwOptions,
            ),
        )
        if code:
            return 0
        if (
            w._process_of(hSourceProcessHandle) is None
            or w._process_of(hTargetProcessHandle) is None
            or hSourceHandle not in w.handles
        ):
            w._error(ERROR_INVALID_HANDLE)
            return 0
        value = w.duplicate_results.pop(0) if w.duplicate_results else next(w._remote_values)
        _contents(lpTargetHandle).value = value
        return 1

    def CloseHandle(self, hObject: int, /) -> int:
        w = self._w
        _, code = w._enter("kernel32", "CloseHandle", (hObject,))
        if code:
            return 0
        info = w.handles.pop(hObject, None)
        if info is None:
            w._error(ERROR_INVALID_HANDLE)
            return 0
        w.closed.append(hObject)
        if info.kind == "pipe-server" and hObject in w.pipes.get(info.name, []):
            w.pipes[info.name].remove(hObject)
        return 1

    def GetCurrentProcess(self) -> int | None:
        self._w._enter("kernel32", "GetCurrentProcess", ())
        return INVALID_HANDLE_VALUE

    def CreateJobObjectW(self, lpJobAttributes: object, lpName: str | None, /) -> int | None:
        w = self._w
        _, code = w._enter("kernel32", "CreateJobObjectW", (lpJobAttributes, lpName))
        if code:
            return None
        return w.new_handle("job")

    def SetInformationJobObject(
        self,
        hJob: int,
        JobObjectInformationClass: int,
        lpJobObjectInformation: object,
        cbJobObjectInformationLength: int,
        /,
    ) -> int:
        w = self._w
        call, code = w._enter(
            "kernel32",
            "SetInformationJobObject",
            (hJob, JobObjectInformationClass, lpJobObjectInformation, cbJobObjectInformationLength),
        )
        info = _contents(lpJobObjectInformation)
        assert isinstance(info, JOBOBJECT_EXTENDED_LIMIT_INFORMATION)
        copy = JOBOBJECT_EXTENDED_LIMIT_INFORMATION.from_buffer_copy(info)
        call.extra["info"] = copy
        call.extra["limit_flags"] = copy.BasicLimitInformation.LimitFlags
        if code:
            return 0
        job = w.handles.get(hJob)
        if job is None or job.kind != "job":
            w._error(ERROR_INVALID_HANDLE)
            return 0
        job.limit_flags = copy.BasicLimitInformation.LimitFlags
        return 1

    def AssignProcessToJobObject(self, hJob: int, hProcess: int, /) -> int:
        w = self._w
        call, code = w._enter("kernel32", "AssignProcessToJobObject", (hJob, hProcess))
        if code:
            return 0
        job = w.handles.get(hJob)
        process = w.handles.get(hProcess)
        if job is None or job.kind != "job" or process is None or process.kind != "process":
            w._error(ERROR_INVALID_HANDLE)
            return 0
        call.extra["pid"] = process.pid
        job.members.append(process.pid)
        return 1

    def TerminateJobObject(self, hJob: int, uExitCode: int, /) -> int:
        w = self._w
        _, code = w._enter("kernel32", "TerminateJobObject", (hJob, uExitCode))
        if code:
            return 0
        job = w.handles.get(hJob)
        if job is None or job.kind != "job":
            w._error(ERROR_INVALID_HANDLE)
            return 0
        job.terminated_with.append(uExitCode)
        return 1

    def CancelIoEx(self, hFile: int, lpOverlapped: object, /) -> int:
        _, code = self._w._enter("kernel32", "CancelIoEx", (hFile, lpOverlapped))
        return 0 if code else 1

    def SetHandleInformation(self, hObject: int, dwMask: int, dwFlags: int, /) -> int:
        w = self._w
        _, code = w._enter("kernel32", "SetHandleInformation", (hObject, dwMask, dwFlags))
        if code:
            return 0
        info = w.handles.get(hObject)
        if info is None:
            w._error(ERROR_INVALID_HANDLE)
            return 0
        info.inheritable = bool(dwFlags & dwMask & 1)
        return 1

    def LocalFree(self, hMem: int, /) -> int | None:
        w = self._w
        _, code = w._enter("kernel32", "LocalFree", (hMem,))
        if code or hMem not in w.local_allocs:
            w._error(code or ERROR_INVALID_HANDLE)
            return hMem
        del w.local_allocs[hMem]
        w.freed.append(hMem)
        return None


class FakeAdvapi32:
    """advapi32 as the transport calls it (see ``transports._windows_api.Advapi32``)."""

    def __init__(self, fake: FakeWindows) -> None:
        self._w = fake

    def OpenProcessToken(
        self, ProcessHandle: int, DesiredAccess: int, TokenHandle: object, /
    ) -> int:
        w = self._w
        call, code = w._enter(
            "advapi32", "OpenProcessToken", (ProcessHandle, DesiredAccess, TokenHandle)
        )
        if code:
            return 0
        pid = w._process_of(ProcessHandle)
        if pid is None:
            w._error(ERROR_INVALID_HANDLE)
            return 0
        token = w.new_handle("token", pid=pid)
        call.extra["handle"] = token
        _contents(TokenHandle).value = token
        return 1

    def GetTokenInformation(
        self,
        TokenHandle: int,
        TokenInformationClass: int,
        TokenInformation: object,
        TokenInformationLength: int,
        ReturnLength: object,
        /,
    ) -> int:
        w = self._w
        call, code = w._enter(
            "advapi32",
            "GetTokenInformation",
            (
                TokenHandle,
                TokenInformationClass,
                TokenInformation,
                TokenInformationLength,
                ReturnLength,
            ),
        )
        if code:
            return 0
        token = w.handles.get(TokenHandle)
        if token is None or token.kind != "token":
            w._error(ERROR_INVALID_HANDLE)
            return 0
        needed = ctypes.sizeof(TOKEN_USER) + _SID_BYTES
        _contents(ReturnLength).value = needed
        if TokenInformation is None or TokenInformationLength < needed:
            w._error(ERROR_INSUFFICIENT_BUFFER)
            return 0
        assert isinstance(TokenInformation, ctypes.Array)
        blob = ctypes.create_string_buffer(_SID_BYTES)
        w._keepalive.append(blob)
        address = ctypes.addressof(blob)
        w.sid_blobs[address] = w.processes[token.pid]
        TOKEN_USER.from_buffer(TokenInformation).User.Sid = address
        call.extra["sid_address"] = address
        return 1

    def ConvertSidToStringSidW(self, Sid: int, StringSid: object, /) -> int:
        w = self._w
        _, code = w._enter("advapi32", "ConvertSidToStringSidW", (Sid, StringSid))
        if code:
            return 0
        text = w.sid_blobs.get(Sid)
        if text is None:
            w._error(ERROR_INVALID_PARAMETER)
            return 0
        buffer = ctypes.create_unicode_buffer(text)
        _contents(StringSid).value = w._alloc("sid-string", text, buffer)
        return 1

    def ConvertStringSecurityDescriptorToSecurityDescriptorW(
        self,
        StringSecurityDescriptor: str,
        StringSDRevision: int,
        SecurityDescriptor: object,
        SecurityDescriptorSize: object,
        /,
    ) -> int:
        w = self._w
        _, code = w._enter(
            "advapi32",
            "ConvertStringSecurityDescriptorToSecurityDescriptorW",
            (
                StringSecurityDescriptor,
                StringSDRevision,
                SecurityDescriptor,
                SecurityDescriptorSize,
            ),
        )
        if code:
            return 0
        buffer = ctypes.create_string_buffer(64)
        _contents(SecurityDescriptor).value = w._alloc("sd", StringSecurityDescriptor, buffer)
        return 1


class FakeNtdll:
    """ntdll as the transport calls it (see ``transports._windows_api.Ntdll``)."""

    def __init__(self, fake: FakeWindows) -> None:
        self._w = fake

    def NtSetInformationFile(
        self,
        FileHandle: int,
        IoStatusBlock: object,
        FileInformation: object,
        Length: int,
        FileInformationClass: int,
        /,
    ) -> int:
        w = self._w
        call, _ = w._enter(
            "ntdll",
            "NtSetInformationFile",
            (FileHandle, IoStatusBlock, FileInformation, Length, FileInformationClass),
        )
        info = _contents(FileInformation)
        assert isinstance(info, FILE_COMPLETION_INFORMATION)
        call.extra["port"] = info.Port
        return w.nt_status_results.pop(0) if w.nt_status_results else 0


def win_oserror(code: int) -> OSError:
    """An ``OSError`` carrying ``winerror`` as trio's IOCP calls raise them on Windows."""
    exc = OSError(f"[WinError {code}] simulated")
    setattr(exc, "winerror", code)  # noqa: B010 - the attribute is Windows-only in typeshed
    return exc


class FakeIo:
    """``OverlappedIo`` for tests: scripted reads, captured writes, gated waits.

    ``reads[handle]`` holds chunks (``bytes``; ``b""`` is end-of-stream) or ints
    (raise that Win32 error); a read with nothing scripted waits until ``feed``.
    ``wait_results`` holds ``None`` (success) or error codes for ``wait``, and
    ``wait_gate``, when set, holds every ``wait`` until the test sets it.
    """

    def __init__(self) -> None:
        self.registered: list[int] = []
        self.register_errors: list[int] = []
        self.reads: dict[int, list[bytes | int]] = {}
        self.read_sizes: list[int] = []
        self.written: dict[int, bytearray] = {}
        self.write_errors: list[int] = []
        self.write_gate: trio.Event | None = None
        self.waits: list[tuple[int, int]] = []
        self.wait_results: list[int | None] = []
        self.wait_gate: trio.Event | None = None
        self._fed = trio.Event()

    def register(self, handle: int) -> None:
        if self.register_errors:
            raise win_oserror(self.register_errors.pop(0))
        self.registered.append(handle)

    def feed(self, handle: int, item: bytes | int) -> None:
        self.reads.setdefault(handle, []).append(item)
        self._fed.set()
        self._fed = trio.Event()

    async def readinto(self, handle: int, buffer: bytearray) -> int:
        await trio.lowlevel.checkpoint()
        self.read_sizes.append(len(buffer))
        while not self.reads.get(handle):
            await self._fed.wait()
        item = self.reads[handle][0]
        if isinstance(item, int):
            self.reads[handle].pop(0)
            raise win_oserror(item)
        count = min(len(item), len(buffer))
        buffer[:count] = item[:count]
        if count == len(item):
            self.reads[handle].pop(0)
        else:
            self.reads[handle][0] = item[count:]
        return count

    async def write(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        await trio.lowlevel.checkpoint()
        if self.write_gate is not None:
            await self.write_gate.wait()
        if self.write_errors:
            raise win_oserror(self.write_errors.pop(0))
        self.written.setdefault(handle, bytearray()).extend(bytes(data))
        return len(data)

    async def wait(self, handle: int, overlapped: OVERLAPPED) -> None:
        self.waits.append((handle, ctypes.addressof(overlapped)))
        if self.wait_gate is not None:
            await self.wait_gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        result = self.wait_results.pop(0) if self.wait_results else None
        if result is not None:
            raise win_oserror(result)


class FakePopen:
    """A ``PopenLike`` child that exits when the test (or ``kill``) says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.killed = False
        self.signal_error: OSError | None = None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._exited.wait(timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.signal_error is not None:
            raise self.signal_error
        self.signals.append(sig)

    def kill(self) -> None:
        self.killed = True
        self.exit(1)

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()


@dataclass
class SpawnRecord:
    """The arguments one ``FakePopenFactory`` call received."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    creationflags: int
    inherited_handles: list[int]
    inheritable_at_spawn: list[bool]


class FakePopenFactory:
    """A ``PopenFactory`` that registers each child as a process of ``fake``."""

    def __init__(self, fake: FakeWindows, *, first_pid: int = 7000) -> None:
        self._fake = fake
        self._pids = itertools.count(first_pid, 4)
        self.spawned: list[FakePopen] = []
        self.records: list[SpawnRecord] = []
        self.errors: list[OSError] = []

    def __call__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        creationflags: int,
        inherited_handles: Sequence[int],
    ) -> FakePopen:
        self.records.append(
            SpawnRecord(
                argv=list(argv),
                env=dict(env),
                cwd=cwd,
                creationflags=creationflags,
                inherited_handles=list(inherited_handles),
                inheritable_at_spawn=[
                    self._fake.handles[h].inheritable if h in self._fake.handles else False
                    for h in inherited_handles
                ],
            )
        )
        if self.errors:
            raise self.errors.pop(0)
        child = FakePopen(next(self._pids))
        self._fake.add_process(child.pid, self._fake.sid)
        self.spawned.append(child)
        return child
