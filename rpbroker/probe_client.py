"""rpbroker's endpoint probe client: ask an endpoint who serves it, and check the answer.

What this module does: ``probe_endpoint`` connects to a backend endpoint, sends
one v1 probe request (0xB232; a fresh 32-byte nonce, the request_id derived from
it as the reference derives it), reads exactly one reply frame, checks that it
echoes the nonce and the request_id, and verifies the ``DaemonProcess`` it
carries against this host (``rpbroker.identity.verify_identity``: endpoint,
pid alive, executable, BLAKE3 hash, boot). The round trip is bounded by the v1
default of 500 ms; like the reference, the identity checks that follow are not
counted against it.

What it does not do: retry, cache results (the client's endpoint cache does), or
decide what a failure means: it raises ``EndpointProbeError`` with a typed
``ProbeFailure`` and the caller falls back or reports.
"""

from __future__ import annotations

import enum
import secrets
from typing import Final

import trio

import transports
from rpbroker.errors import BrokerError
from rpbroker.identity import IdentityCheck, IdentityRejected, verify_identity
from rpbroker.wire import DaemonProcess
from rpbroker.wire.frames import MalformedMessage
from rpbroker.wire.framing import FramingError, read_frame_body
from rpbroker.wire.probe import (
    PROBE_NONCE_BYTES,
    parse_probe_reply,
    probe_request_frame,
    probe_request_id,
)

#: Bound on the probe round trip (connect, request, reply), seconds: the v1
#: default (facts §0: 500 ms), so a probe here gives up exactly when the
#: reference's would.
DEFAULT_PROBE_TIMEOUT_S: Final = 0.5
#: Largest reply body accepted (bytes). A ``DaemonProcess`` is a few hundred bytes
#: (two paths, a boot id, a hash); 64 KiB bounds what a hostile endpoint can make
#: the prober buffer, where v1 would allow 16 MiB.
PROBE_REPLY_MAX_BYTES: Final = 64 * 1024


class ProbeFailure(enum.Enum):
    """Why a probe did not confirm the endpoint's identity."""

    UNREACHABLE = "unreachable"  # nothing accepted the connection, or it broke
    TIMEOUT = "timeout"  # no complete reply within the bound
    BAD_REPLY = "bad-reply"  # not a valid probe reply to this request
    IDENTITY = "identity"  # a valid reply whose identity fails a check


class EndpointProbeError(BrokerError):
    """A probe of ``endpoint`` failed; ``failure`` says how, ``check`` which identity check."""

    def __init__(
        self,
        endpoint: str,
        failure: ProbeFailure,
        detail: str,
        check: IdentityCheck | None = None,
    ) -> None:
        super().__init__(f"endpoint probe of {endpoint} failed ({failure.value}): {detail}")
        self.endpoint = endpoint
        self.failure = failure
        self.detail = detail
        self.check = check


async def _round_trip(endpoint: str, request: bytes) -> bytes:
    try:
        stream = await transports.connect(endpoint)
    except transports.TransportError as exc:
        raise EndpointProbeError(endpoint, ProbeFailure.UNREACHABLE, str(exc)) from exc
    try:
        await stream.send_all(request)
        return await read_frame_body(stream, PROBE_REPLY_MAX_BYTES)
    except FramingError as exc:
        raise EndpointProbeError(endpoint, ProbeFailure.BAD_REPLY, str(exc)) from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise EndpointProbeError(endpoint, ProbeFailure.UNREACHABLE, str(exc)) from exc
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def probe_endpoint(
    endpoint: str,
    *,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    recorded: DaemonProcess | None = None,
) -> DaemonProcess:
    """Probe ``endpoint`` and return the verified identity of the process serving it.

    ``recorded``, when given, is an identity stored earlier that the answer must
    match (pid, exe_path, exe_hash, boot_id, endpoint), as the reference requires
    of a manifest's daemon.

    Raises ``EndpointProbeError``: ``UNREACHABLE``, ``TIMEOUT`` (the round trip
    took longer than ``timeout_s``), ``BAD_REPLY`` or ``IDENTITY`` (with the failed
    ``IdentityCheck``).

    Cancellation: the probe connection is closed and any hashing thread waited
    for; nothing is left open.
    """
    nonce = secrets.token_bytes(PROBE_NONCE_BYTES)
    request_id = probe_request_id(nonce)
    with trio.move_on_after(timeout_s) as scope:
        body = await _round_trip(endpoint, probe_request_frame(nonce, request_id=request_id))
    if scope.cancelled_caught:
        raise EndpointProbeError(endpoint, ProbeFailure.TIMEOUT, f"no reply within {timeout_s:g} s")
    try:
        identity = parse_probe_reply(body, nonce, request_id=request_id)
    except MalformedMessage as exc:
        raise EndpointProbeError(endpoint, ProbeFailure.BAD_REPLY, str(exc)) from exc
    verdict = await verify_identity(identity, endpoint=endpoint, recorded=recorded)
    if isinstance(verdict, IdentityRejected):
        raise EndpointProbeError(endpoint, ProbeFailure.IDENTITY, verdict.detail, verdict.check)
    return verdict.identity
