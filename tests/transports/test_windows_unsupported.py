"""What the Windows transport does not do, and how it says so.

Blocking connect is refused with a typed error (pipes are not sockets); socket
activation and ``sd_notify`` do not exist there, so they are inert, never errors.
"""

from __future__ import annotations

import pytest

from transports import NotifyDelivery, PlatformUnsupportedError, TransportError
from transports._windows import connect_blocking, inherited_listener, service_notifier


def test_blocking_connect_is_refused_with_a_typed_error() -> None:
    path = "\\\\.\\pipe\\rpb-v1-0123456789abcdef-shared"
    with pytest.raises(PlatformUnsupportedError, match="named pipes") as caught:
        connect_blocking(path, 1.0)
    assert isinstance(caught.value, NotImplementedError)
    assert isinstance(caught.value, TransportError)
    assert path in str(caught.value)


def test_no_socket_activation_and_the_environment_is_left_alone() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "NOTIFY_SOCKET": "/run/x"}
    assert inherited_listener(env) is None
    notifier = service_notifier(env)
    assert notifier.ready("x") is NotifyDelivery.NO_SERVICE_MANAGER
    assert notifier.stopping("x") is NotifyDelivery.NO_SERVICE_MANAGER
    assert notifier.status("x") is NotifyDelivery.NO_SERVICE_MANAGER
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1", "NOTIFY_SOCKET": "/run/x"}
