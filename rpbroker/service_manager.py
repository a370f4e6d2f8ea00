"""The broker's side of its service manager (systemd): the socket it passes, the state we report.

What this module does: ``ServiceManagerLink`` hands the broker its listener (the
socket systemd passed under socket activation, else a freshly bound one) and
reports readiness and the start of shutdown to the service manager, each as one
call at the broker's existing start and stop points. With
``ServiceManager.NONE`` (the default for embedders) it only binds: the process
environment is neither read nor changed.

What it does not do: anything platform specific (``transports.inherited_listener``
and ``transports.service_notifier`` do; both are no-ops on Windows), keep the
broker from running when a notification cannot be delivered (that is logged), or
remove an inherited socket file at exit (systemd owns it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

import transports
from rpbroker.config import BrokerConfig, ServiceManager
from rpbroker.errors import ConfigError

logger = logging.getLogger("rpbroker.service_manager")


class ServiceManagerLink:
    """What one broker receives from and reports to its service manager."""

    def __init__(self, config: BrokerConfig) -> None:
        self._kind = config.service_manager
        #: The explicitly configured endpoint, absolute, to compare with an inherited one.
        self._configured_path = (
            os.path.abspath(config.socket_path) if config.socket_path is not None else None
        )
        self._notifier: transports.ServiceNotifier | None = None

    async def open_listener(self, socket_path: str) -> transports.Listener:
        """The inherited socket if systemd passed one, else ``socket_path`` freshly bound.

        Under ``ServiceManager.SYSTEMD`` this reads (and removes) ``LISTEN_*`` and
        ``NOTIFY_SOCKET`` from the environment first, so backends never inherit them.
        Raises ``transports.SocketActivationError`` for unusable variables or a
        passed descriptor that is not a listening ``AF_UNIX`` stream socket,
        ``ConfigError`` when a configured ``socket_path`` is not the inherited
        socket's path, and what ``transports.open_listener`` raises.

        Cancellation: as ``transports.open_listener``; an inherited socket is only
        adopted once the call can no longer be cancelled.
        """
        if self._kind is not ServiceManager.SYSTEMD:
            return await transports.open_listener(socket_path)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._notifier = transports.service_notifier()
        inherited = transports.inherited_listener()
        if inherited is None:
            return await transports.open_listener(socket_path)
        configured = self._configured_path
        if configured is not None and configured != inherited.path:
            await inherited.aclose()  # closes our copy; the file stays systemd's
            raise ConfigError(
                f"BrokerConfig.socket_path (--socket) is {configured}, but systemd passed the "
                f"socket {inherited.path}; leave it unset or make it match ListenStream="
            )
        await trio.lowlevel.cancel_shielded_checkpoint()
        return inherited

    def ready(self, socket_path: str) -> None:
        """Tell the service manager the broker accepts connections (``READY=1``)."""
        self._notify(lambda notifier: notifier.ready(f"serving on {socket_path}"))

    def stopping(self, drain_timeout_s: float) -> None:
        """Tell the service manager shutdown has begun (``STOPPING=1``)."""
        self._notify(
            lambda notifier: notifier.stopping(
                f"shutting down: draining backends for up to {drain_timeout_s:g} s"
            )
        )

    def _notify(self, send: Callable[[transports.ServiceNotifier], object]) -> None:
        if self._notifier is None:
            return
        try:
            send(self._notifier)
        except transports.TransportError as exc:
            logger.warning("%s", exc)


__all__ = ["ServiceManagerLink"]
