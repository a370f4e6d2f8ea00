"""How a backend comes to life: the launcher seam between the supervisor and the OS.

What this module does: defines the ``BackendLauncher`` protocol the supervisor
calls to start one backend (a process-like handle plus a connected control
channel), and ``ProcessLauncher``, the real one: a fresh control channel created
before the spawn, the broker's environment plus the service's, and a child that
dies with the broker (``transports.spawn_child``), its stdout and stderr piped to
the broker (``process.output``; the incarnation reads them).

What it does not do: wait for readiness, restart anything, or decide anything;
the supervisor does. ``rpbroker.testing`` provides an in-process launcher with the
same protocol, so the whole broker can run under trio's ``MockClock``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Protocol

import attrs

import transports
from rpbroker.services import ServiceSpec

logger = logging.getLogger("rpbroker.launcher")

ENV_ENDPOINT = "RPBROKER_BACKEND_ENDPOINT"
ENV_SERVICE_NAME = "RPBROKER_SERVICE_NAME"
ENV_SERVICE_VERSION = "RPBROKER_SERVICE_VERSION"
ENV_INSTANCE = "RPBROKER_INSTANCE"


@attrs.frozen
class LaunchRequest:
    """Everything needed to start one backend incarnation."""

    service_name: str
    service_version: str
    instance: str
    endpoint: str
    spec: ServiceSpec
    extra_env: Mapping[str, str] = attrs.field(factory=dict)

    def environment(self) -> dict[str, str]:
        """The backend's variables: where to listen and what it serves."""
        return {
            ENV_ENDPOINT: self.endpoint,
            ENV_SERVICE_NAME: self.service_name,
            ENV_SERVICE_VERSION: self.service_version,
            ENV_INSTANCE: self.instance,
            # The reference launcher's names, for backends written against it.
            "RUNNING_PROCESS_BROKER_V1_SERVICE_NAME": self.service_name,
            "RUNNING_PROCESS_BROKER_V1_SERVICE_VERSION": self.service_version,
            "RUNNING_PROCESS_BROKER_V1_BACKEND_PIPE": self.endpoint,
            "RUNNING_PROCESS_BROKER_V1_INSTANCE": self.instance,
        }


@attrs.frozen
class LaunchedBackend:
    """A started backend: its process (or stand-in) and the broker's end of its channel.

    ``channel`` is ``None`` for a foreign backend: it has no control channel.
    """

    process: transports.ChildProcess
    channel: transports.ControlChannel | None


class BackendLauncher(Protocol):
    async def launch(self, request: LaunchRequest) -> LaunchedBackend:
        """Start one backend. Raises ``transports.SpawnError`` if it cannot start.

        Cancellation: a cancelled launch leaves no process or channel behind.
        """
        ...


class ProcessLauncher:
    """Starts backends as real child processes with an inherited control channel.

    A foreign backend (``spec.foreign``) gets its endpoint cleared first (a dead
    socket of this user left there is removed; anything else refuses the launch,
    see ``transports.clear_stale_endpoint``) and no control channel: the pair the
    spawn needs is closed on the broker's side at once, so the child's inherited
    end only ever reads EOF.
    """

    async def launch(self, request: LaunchRequest) -> LaunchedBackend:
        if request.spec.foreign is not None:
            _clear_foreign_endpoint(request.endpoint)
        try:
            channel, child = transports.open_control_pair()
        except OSError as exc:
            raise transports.SpawnError(f"cannot create the control channel: {exc}") from exc
        env = dict(os.environ)
        env.update(request.extra_env)
        env.update(request.spec.env)
        env.update(child.env)
        env.update(request.environment())
        env.setdefault("RPBROKER_PYTHON", sys.executable)
        try:
            process = await transports.spawn_child(
                request.spec.argv(request.endpoint), env, child, capture_output=True
            )
        except BaseException:
            await channel.aclose()
            raise
        if request.spec.foreign is not None:
            await channel.aclose()
            return LaunchedBackend(process=process, channel=None)
        return LaunchedBackend(process=process, channel=channel)


def _clear_foreign_endpoint(endpoint: str) -> None:
    """Free a foreign backend's endpoint before its launch, or raise ``SpawnError`` saying why."""
    try:
        removed = transports.clear_stale_endpoint(endpoint)
    except transports.TransportError as exc:
        raise transports.SpawnError(
            f"the foreign backend's endpoint cannot be used: {exc}"
        ) from exc
    if removed:
        logger.info("removed the stale socket %s of a foreign backend that is gone", endpoint)
