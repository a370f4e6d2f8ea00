"""The Windows transport has no blocking connect: a clear, typed refusal instead."""

from __future__ import annotations

import pytest

from transports import PlatformUnsupportedError, TransportError
from transports._windows import connect_blocking


def test_blocking_connect_is_refused_with_a_typed_error() -> None:
    path = "\\\\.\\pipe\\rpb-v1-0123456789abcdef-shared"
    with pytest.raises(PlatformUnsupportedError, match="named pipes") as caught:
        connect_blocking(path, 1.0)
    assert isinstance(caught.value, NotImplementedError)
    assert isinstance(caught.value, TransportError)
    assert path in str(caught.value)
