"""Process identity of the endpoint probe: build this process's, verify another's.

What this module does: ``local_identity`` builds the ``DaemonProcess`` a backend
reports in its probe reply, the way the v1 reference builds it: the pid, the
real executable the kernel runs (not an interpreter symlink), the 32-byte
BLAKE3 of that file with ``exe_hash_algorithm = "blake3"``, the kernel's boot
id, the endpoint, the start time and the idle timeout. The executable facts are
computed once per process (in practice: once per trio run, which for a backend
is its whole life). ``verify_identity`` checks an identity another process
claims against what this host says about that pid, with the reference's rules:
the identity is well formed (endpoint present, algorithm ``blake3``, 32-byte
hash), it names the endpoint that was dialled, it matches a recorded identity
field for field when one is given, the pid is not 0, the boot is this boot
(compared only when both sides know theirs), the pid's executable is the
claimed one once both paths are resolved, the file hashes to the claimed hash,
and the process is still alive at the end.

What it does not do: any I/O on endpoints (``rpbroker.probe_client`` sends the
probe), decide what a rejection means for a caller (Hello-skip falls back to a
Hello), or read platform facts itself (``transports.boot_id`` and
``transports.process_executable`` do).
"""

from __future__ import annotations

import enum
import os
import time
from typing import Final

import attrs
import blake3
import trio

import transports
from rpbroker.wire import DaemonProcess, Endpoint

#: The only executable hash algorithm v1 identities carry.
EXE_HASH_ALGORITHM: Final = "blake3"
#: Length of a BLAKE3 digest (bytes).
EXE_HASH_BYTES: Final = 32
#: Read size while hashing an executable (bytes): large reads, few system calls.
_HASH_READ_BYTES: Final = 1 << 20


@attrs.frozen
class ProcessFacts:
    """What this host says about one process: the fields an identity is checked against."""

    pid: int
    exe_path: str
    exe_hash: bytes
    boot_id: str


_LOCAL_FACTS: Final = trio.lowlevel.RunVar[ProcessFacts]("rpbroker_local_process_facts")


def file_blake3(path: str) -> bytes:
    """The BLAKE3 digest of the file at ``path`` (blocking; ``OSError`` if unreadable)."""
    hasher = blake3.blake3()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_READ_BYTES):
            hasher.update(chunk)
    return hasher.digest()


def _unavailable_boot_id(pid: int) -> str:
    # Fail closed, as the reference does: a host that cannot name its boot gets a
    # token no other process shares, so no identity ever matches "the same boot"
    # by accident.
    return f"rpbroker-boot-unavailable-{pid}-{time.time_ns()}"


def local_process_facts() -> ProcessFacts:
    """This process's pid, executable, executable hash and boot id, computed once per run.

    The first call reads and hashes the executable synchronously (a few
    milliseconds even for a statically linked interpreter): it runs once per
    process, and never waiting on a thread keeps it exact under
    trio's ``MockClock``. Must be called inside ``trio.run``.
    """
    try:
        return _LOCAL_FACTS.get()
    except LookupError:
        pass
    pid = os.getpid()
    exe_path = transports.process_executable(pid)
    facts = ProcessFacts(
        pid=pid,
        exe_path=exe_path,
        exe_hash=file_blake3(exe_path),
        boot_id=transports.boot_id() or _unavailable_boot_id(pid),
    )
    _LOCAL_FACTS.set(facts)
    return facts


def local_identity(
    endpoint: Endpoint, *, started_at_unix_ms: int, idle_timeout_secs: int | None = None
) -> DaemonProcess:
    """The ``DaemonProcess`` this process reports for ``endpoint`` in a probe reply."""
    facts = local_process_facts()
    identity = DaemonProcess(
        pid=facts.pid,
        exe_path=facts.exe_path,
        ipc_endpoint=endpoint,
        started_at_unix_ms=started_at_unix_ms,
        boot_id=facts.boot_id,
        exe_hash_algorithm=EXE_HASH_ALGORITHM,
        exe_hash=facts.exe_hash,
    )
    if idle_timeout_secs is not None:
        identity.idle_timeout_secs = idle_timeout_secs
    return identity


class IdentityCheck(enum.Enum):
    """The check an identity failed, in the order they run."""

    ENDPOINT = "ipc_endpoint"
    HASH_ALGORITHM = "exe_hash_algorithm"
    HASH_LENGTH = "exe_hash length"
    RECORDED = "recorded identity"
    PID = "pid"
    BOOT_ID = "boot_id"
    PROCESS = "process"
    EXE_PATH = "exe_path"
    EXE_HASH = "exe_hash"


@attrs.frozen
class IdentityVerified:
    """Every check passed: ``identity`` is the process behind the endpoint."""

    identity: DaemonProcess


@attrs.frozen
class IdentityRejected:
    """``check`` failed; ``detail`` says what was found."""

    check: IdentityCheck
    detail: str


IdentityVerdict = IdentityVerified | IdentityRejected


def same_executable_path(actual: str, claimed: str) -> bool:
    """Whether two spellings name the same file once links are resolved (as written if not)."""
    return os.path.realpath(actual) == os.path.realpath(claimed)


def _recorded_mismatch(identity: DaemonProcess, recorded: DaemonProcess) -> str | None:
    # The reference's field-for-field comparison, in its order.
    pairs = (
        ("pid", identity.pid, recorded.pid),
        ("exe_path", identity.exe_path, recorded.exe_path),
        ("exe_hash", identity.exe_hash, recorded.exe_hash),
        ("boot_id", identity.boot_id, recorded.boot_id),
        ("ipc_endpoint", identity.ipc_endpoint, recorded.ipc_endpoint),
    )
    for name, got, want in pairs:
        if got != want:
            return f"{name} differs from the recorded identity"
    return None


def _shape_problem(identity: DaemonProcess, endpoint: str) -> IdentityRejected | None:
    if not identity.HasField("ipc_endpoint"):
        return IdentityRejected(IdentityCheck.ENDPOINT, "the identity names no endpoint")
    if identity.ipc_endpoint.path != endpoint:
        return IdentityRejected(
            IdentityCheck.ENDPOINT,
            f"the identity names endpoint {identity.ipc_endpoint.path!r}, not {endpoint!r}",
        )
    if identity.exe_hash_algorithm != EXE_HASH_ALGORITHM:
        return IdentityRejected(
            IdentityCheck.HASH_ALGORITHM,
            f"exe_hash_algorithm is {identity.exe_hash_algorithm!r}, expected "
            f"{EXE_HASH_ALGORITHM!r}",
        )
    if len(identity.exe_hash) != EXE_HASH_BYTES:
        return IdentityRejected(
            IdentityCheck.HASH_LENGTH,
            f"exe_hash is {len(identity.exe_hash)} bytes, expected {EXE_HASH_BYTES}",
        )
    return None


def _host_facts(pid: int) -> ProcessFacts | IdentityRejected:
    """What this host says about ``pid`` except the hash (``exe_hash`` left empty)."""
    local = local_process_facts()
    if pid == local.pid:
        return local
    try:
        exe_path = transports.process_executable(pid)
    except transports.TransportError as exc:  # gone, or not ours to inspect
        return IdentityRejected(IdentityCheck.PROCESS, str(exc))
    return ProcessFacts(pid=pid, exe_path=exe_path, exe_hash=b"", boot_id=local.boot_id)


async def verify_identity(
    identity: DaemonProcess, *, endpoint: str, recorded: DaemonProcess | None = None
) -> IdentityVerdict:
    """Check ``identity``, as claimed by whatever answered at ``endpoint``, against this host.

    ``recorded`` is an identity stored earlier (a manifest, an identity file); when
    given, the claim must match it in pid, exe_path, exe_hash, boot_id and endpoint.

    Cancellation: hashing another process's executable runs in a worker thread
    and is waited for (a few milliseconds); nothing is left behind.
    """
    await trio.lowlevel.checkpoint()
    problem = _shape_problem(identity, endpoint)
    if problem is not None:
        return problem
    if recorded is not None and (mismatch := _recorded_mismatch(identity, recorded)):
        return IdentityRejected(IdentityCheck.RECORDED, mismatch)
    if identity.pid == 0:
        return IdentityRejected(IdentityCheck.PID, "pid 0 names no process")
    facts = _host_facts(identity.pid)
    if isinstance(facts, IdentityRejected):
        return facts
    if identity.boot_id and facts.boot_id and identity.boot_id != facts.boot_id:
        return IdentityRejected(
            IdentityCheck.BOOT_ID,
            f"boot_id {identity.boot_id!r} is not this boot ({facts.boot_id!r})",
        )
    if not same_executable_path(facts.exe_path, identity.exe_path):
        return IdentityRejected(
            IdentityCheck.EXE_PATH,
            f"pid {identity.pid} runs {facts.exe_path!r}, not {identity.exe_path!r}",
        )
    digest = facts.exe_hash
    if not digest:
        try:
            digest = await trio.to_thread.run_sync(file_blake3, facts.exe_path)
        except OSError as exc:
            return IdentityRejected(
                IdentityCheck.EXE_HASH, f"cannot hash {facts.exe_path!r}: {exc.strerror}"
            )
        still = _host_facts(identity.pid)
        if isinstance(still, IdentityRejected) or still.exe_path != facts.exe_path:
            return IdentityRejected(IdentityCheck.PROCESS, f"pid {identity.pid} exited")
    if digest != identity.exe_hash:
        return IdentityRejected(
            IdentityCheck.EXE_HASH, f"the BLAKE3 of {facts.exe_path!r} is not the claimed hash"
        )
    return IdentityVerified(identity)
