"""Readiness of a foreign backend: check its endpoint until it answers, and tell the lifecycle.

What this module does: a foreign backend (a ``[foreign]`` service definition: not
an rpbroker SDK process) has no control channel to report ready on, so
:func:`check_until_ready` checks its endpoint while the incarnation is starting:
by a v1 endpoint probe (``ready = "probe"``) or by connecting (``ready =
"connect"``). Each result is an input of the incarnation's lifecycle, fed
through :meth:`Incarnation.feed`: ``ReadyReported`` on success (the backend is
routable from that step on), ``ReadinessCheckFailed`` with what was seen
otherwise. Between checks it sleeps per :class:`ReadinessBackoff` (50 ms, then
backing off to 2 s), never past the ready deadline.

The probe's identity decision: the reply must echo the nonce and request id and
its ``DaemonProcess`` must verify against this host as every probe's does
(``rpbroker.identity.verify_identity``: it names the endpoint the broker gave
the backend, its pid is alive and runs the claimed executable, whose BLAKE3
matches, on this boot). Its pid need *not* be the pid the broker launched: a
wrapper (a shell script, a language launcher) may fork the real server, and the
broker supervises the launched process's whole group anyway. An endpoint that
something else already served before the launch is refused by the launcher
(``transports.clear_stale_endpoint``), so the answer comes from what was started.

What it does not do: decide that the spawn failed. The lifecycle's ready timer
ends the start, a process exit before ready is a spawn failure (its watcher
reports it), and the checks stop as soon as the incarnation leaves STARTING.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

import transports
from rpbroker.policy.lifecycle import Phase, ReadinessCheckFailed, ReadyReported
from rpbroker.policy.spawn_wait import ReadinessBackoff
from rpbroker.probe_client import EndpointProbeError, probe_endpoint
from rpbroker.services import ForeignBackend, ForeignReady

if TYPE_CHECKING:
    from rpbroker.supervisor.incarnation import Incarnation

#: Bound on one connect check, seconds: the v1 probe's own bound (500 ms), so both
#: kinds of check give up alike; a local socket accepts in microseconds.
CONNECT_CHECK_TIMEOUT_S: Final[float] = 0.5


async def check_endpoint(foreign: ForeignBackend, endpoint: str) -> str | None:
    """Check once whether ``endpoint`` is ready; ``None`` if it is, else what was seen.

    Cancellation: the check's connection is closed; nothing is left open.
    """
    if foreign.ready is ForeignReady.PROBE:
        try:
            await probe_endpoint(endpoint)
        except EndpointProbeError as exc:
            return f"probe {exc.failure.value}: {exc.detail}"
        return None
    with trio.move_on_after(CONNECT_CHECK_TIMEOUT_S):
        try:
            stream = await transports.connect(endpoint)
        except transports.TransportError as exc:
            return f"connect failed: {exc}"
        await stream.aclose()
        return None
    return f"connect did not complete within {CONNECT_CHECK_TIMEOUT_S:g} s"


async def check_until_ready(incarnation: Incarnation, foreign: ForeignBackend) -> None:
    """Check ``incarnation``'s endpoint until it is ready or no longer starting.

    Feeds ``ReadyReported`` once, on the first successful check, and
    ``ReadinessCheckFailed`` for every failed one.

    Cancellation: stops checking (the incarnation's nursery cancels it when the
    backend exits); a check in progress closes its connection.
    """
    backoff = ReadinessBackoff()
    failed = 0
    while incarnation.lifecycle.phase is Phase.STARTING:
        problem = await check_endpoint(foreign, incarnation.endpoint)
        if incarnation.lifecycle.phase is not Phase.STARTING:
            return
        if problem is None:
            incarnation.feed(ReadyReported())
            return
        failed += 1
        incarnation.feed(ReadinessCheckFailed(problem))
        now = trio.current_time()
        await trio.sleep_until(backoff.next_check_at(failed, now, incarnation.lifecycle.deadline))
