"""What the Windows transport does not do, and how it says so.

Blocking connect is refused with a typed error (pipes are not sockets); socket
activation and ``sd_notify`` do not exist there, so they are inert, never errors;
non-waiting reads and writes report that nothing could be done.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from transports import NotifyDelivery, PlatformUnsupportedError, TransportError
from transports._windows import (
    close_now,
    connect_blocking,
    inherited_listener,
    receive_now,
    send_now,
    service_notifier,
)


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


async def test_no_reading_writing_or_closing_without_waiting() -> None:
    # The broker then serves every connection in its task, as it would anyway.
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"hello")
    assert receive_now(b, 5) is None
    assert send_now(b, b"reply") == 0
    assert close_now(b) is False
    assert await b.receive_some(5) == b"hello", "nothing was taken"
