"""Refusals carry the values that explain them, from a real broker to the client's exception.

The broker fills ``Refused.details`` (rpbroker's keys; a reference client ignores
the map) and ``RefusedError`` exposes them as typed attributes.
"""

from __future__ import annotations

import pytest
import trio

import rpbroker
import transports
from rpbroker.client import hello_frame, negotiated_or_raise
from rpbroker.policy.hello import SERVICE_NAME_GRAMMAR, VERSION_GRAMMAR
from rpbroker.wire import HelloReply
from rpbroker.wire.codes import RefusalCode
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body

from .support import Workspace


async def raw_hello(socket_path: str, service: str, version: str) -> HelloReply:
    """Send a Hello the client would refuse to send; return the broker's reply."""
    stream = await transports.connect(socket_path)
    async with stream:
        await stream.send_all(hello_frame(service, version, handoff=False))
        body = await read_frame_body(stream, MAX_FRAME_BYTES)
    return decode(HelloReply, decode_frame(body).payload)


async def test_unknown_service_names_the_service(broker: rpbroker.Broker) -> None:
    with trio.fail_after(30), pytest.raises(rpbroker.RefusedError) as caught:
        await rpbroker.open_connection("nosuch", "1.0.0", broker=broker.socket_path)
    error = caught.value
    assert error.code is RefusalCode.SERVICE_UNKNOWN
    assert error.service_name == "nosuch"
    assert dict(error.details) == {"service_name": "nosuch"}
    assert "service_name='nosuch'" in str(error)


async def test_blocked_version_names_wanted_floor_and_allow_list(workspace: Workspace) -> None:
    workspace.add_service("echo", min_version="1.1.0", allow_list=("1.1.0", "1.2.0"))
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(30):
            with pytest.raises(rpbroker.RefusedError) as below:
                await rpbroker.open_connection("echo", "1.0.5", broker=broker.socket_path)
            with pytest.raises(rpbroker.RefusedError) as outside:
                await rpbroker.open_connection("echo", "1.3.0", broker=broker.socket_path)
    for caught, wanted, reason in [
        (below, "1.0.5", "wanted_version is below min_version"),
        (outside, "1.3.0", "wanted_version is not in version_allow_list"),
    ]:
        error = caught.value
        assert (error.code, error.reason) == (RefusalCode.VERSION_BLOCKED, reason)
        assert error.retry_after_ms == 30_000
        assert error.wanted_version == wanted
        assert error.min_version == "1.1.0"
        assert error.version_allow_list == ("1.1.0", "1.2.0")


@pytest.mark.parametrize(
    ("service", "version", "field", "value", "grammar"),
    [
        ("Echo;rm -rf", "1.0.0", "service_name", "Echo;rm -rf", SERVICE_NAME_GRAMMAR),
        ("echo", "1.0\x1b[2J", "wanted_version", "1.0\\x1b[2J", VERSION_GRAMMAR),
    ],
)
async def test_rejected_hello_field_is_named_with_its_value_and_grammar(
    broker: rpbroker.Broker, service: str, version: str, field: str, value: str, grammar: str
) -> None:
    with trio.fail_after(30):
        reply = await raw_hello(broker.socket_path, service, version)
    with pytest.raises(rpbroker.RefusedError) as caught:
        negotiated_or_raise(reply)
    error = caught.value
    assert error.code is RefusalCode.PEER_REJECTED
    assert (error.rejected_field, error.rejected_value, error.grammar) == (field, value, grammar)


async def test_hostile_value_comes_back_truncated(broker: rpbroker.Broker) -> None:
    with trio.fail_after(30):
        reply = await raw_hello(broker.socket_path, "x" * 60_000, "1.0.0")
    assert RefusalCode(reply.refused.code) is RefusalCode.PEER_REJECTED
    quoted = reply.refused.details["value"]
    assert quoted.startswith("x" * 80) and quoted.endswith("...") and len(quoted) == 83
    assert len(reply.SerializeToString()) < 512
