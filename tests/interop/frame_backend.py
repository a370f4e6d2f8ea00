"""An rpbroker SDK backend that answers v1 frames, for the reference's ServiceClient.

Every REQUEST frame it reads is answered with a RESPONSE on the same lane whose
payload is ``b"pong:"`` followed by the request's payload (what the reference's
own ``ServiceServer`` tests do). The SDK answers endpoint probes before this
handler ever sees a connection.
"""

from __future__ import annotations

import trio

from rpbroker.backend import run_backend
from rpbroker.wire import FrameKind, decode_frame, framed, response_to
from rpbroker.wire.framing import FramingError, read_frame_body


async def pong(stream: trio.abc.Stream) -> None:
    while True:
        try:
            body = await read_frame_body(stream)
        except FramingError:
            return  # end of stream (or garbage): this connection is done
        frame = decode_frame(body)
        if int(frame.kind) == FrameKind.REQUEST:
            await stream.send_all(framed(response_to(frame, b"pong:" + frame.payload)))


if __name__ == "__main__":
    run_backend(pong)
