"""A trio stream that first hands out bytes already read from the stream it wraps.

What this module does: ``PrefixedStream`` delegates everything to an inner stream,
except that ``receive_some`` returns a prefix of already-received bytes before
reading from the inner stream again. The client uses it for backend bytes that
arrived together with the broker's frames; the backend SDK for bytes it looked at
while checking for an endpoint probe.

What it does not do: buffer anything else, or parse what it returns.
"""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``inner`` with ``prefix`` in front of whatever it receives next.

    ``send_eof`` is forwarded when ``inner`` supports half-close and ignored
    otherwise. Cancellation is that of ``inner``; returning prefix bytes is a
    plain checkpoint.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes = b"") -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()
