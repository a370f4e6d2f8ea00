"""A bounded queue for one live follower that drops its oldest items when it falls behind.

What this module does: ``DroppingQueue`` is the buffer behind an event subscription
(``rpbroker.events``) and a backend-output follower (``rpbroker.supervisor.output``):
``push`` never blocks (the producer is the broker's own code), a full queue drops
its oldest item and counts it, ``get`` waits for the next item until the queue is
ended and drained.

What it does not do: know its producer, unsubscribe, or decide how a loss is told
to the reader; its owner does (the counts are here for it).
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class DroppingQueue(Generic[T]):
    """At most ``capacity`` items; the oldest go first when it is full."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._wakeup = trio.Event()
        self._ended = False
        self._unreported = 0
        #: Items lost by falling behind, in all.
        self.dropped = 0

    def push(self, item: T) -> None:
        """Queue ``item`` (dropping the oldest if full) and wake the reader."""
        if len(self._items) >= self._capacity:
            self._items.popleft()
            self.dropped += 1
            self._unreported += 1
        self._items.append(item)
        self._wakeup.set()

    def end(self) -> None:
        """No more items: ``get`` raises ``StopAsyncIteration`` once drained."""
        self._ended = True
        self._wakeup.set()

    def take_unreported(self) -> int:
        """Items lost since the last call (and reset that count)."""
        lost, self._unreported = self._unreported, 0
        return lost

    async def wait(self) -> bool:
        """Wait until an item is queued (``True``) or the queue is ended and drained.

        Cancellation: just stops waiting. Woken with an item queued, it returns
        without another checkpoint, so an item that woke the reader is never lost
        to a cancel before ``pop`` takes it.
        """
        if self._items:
            await trio.lowlevel.checkpoint()
        while not self._items:
            if self._ended:
                return False
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return True

    def pop(self) -> T:
        """The oldest queued item (call after ``wait`` returned ``True``)."""
        return self._items.popleft()

    async def get(self) -> T:
        """The oldest queued item, waiting for one.

        Raises:
            StopAsyncIteration: the queue was ended and is drained.

        Cancellation: as ``wait``; no item is lost.
        """
        if not await self.wait():
            raise StopAsyncIteration
        return self.pop()
