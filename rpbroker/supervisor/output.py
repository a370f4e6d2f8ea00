"""Backend output: each backend's stdout and stderr, read line by line, logged and kept.

What this module does: :class:`LineSplitter` (sans-IO) cuts a byte stream into
lines, bounding a line without a newline. :class:`OutputCapture` owns the read
ends of one backend's stdout and stderr pipes and drains them with one task per
stream, always, so a backend that writes a lot never blocks on a full pipe; each
line is logged at INFO on the ``rpbroker.backend`` logger as ``key=value``
fields (service, version, pid, stream, line) and kept. :class:`OutputLog` keeps
the last :data:`KEPT_LINES_PER_BACKEND` lines of every backend (and of the last
few that ended, so ``rpbroker logs`` still shows a crashed backend's last words)
and feeds live followers through bounded queues (:class:`LineFollower`): a slow
follower loses lines and is told how many, the broker never waits for it.

What it does not do: decide when a backend starts or ends (the incarnation does),
rotate or ship logs, or parse what backends write.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any, Final

import attrs
import trio

import transports
from rpbroker._dropping_queue import DroppingQueue
from rpbroker.logfmt import KeyValues

logger = logging.getLogger("rpbroker.backend")

#: Longest kept line, bytes: a longer one is cut here and the rest of it, up to
#: its newline, dropped (``truncated``). Bounds the memory and log volume of one
#: line whatever a backend writes (a line without a newline included).
MAX_LINE_BYTES: Final[int] = 4096
#: Bytes read from a pipe at once: one pipe buffer's worth on Linux (64 KiB).
READ_CHUNK_BYTES: Final[int] = 65536
#: Lines kept per backend, both streams together: enough to see why a backend
#: failed, small enough for many backends (at most ~800 KiB each).
KEPT_LINES_PER_BACKEND: Final[int] = 200
#: Ended backends whose kept lines stay available (``rpbroker logs`` after a crash).
KEPT_ENDED_BACKENDS: Final[int] = 16
#: Lines of stderr quoted in a spawn failure (refusal message and event): the
#: traceback's end, which says what went wrong.
FAILURE_TAIL_LINES: Final[int] = 5
#: Bound on the quoted stderr tail, characters (a refusal travels in a frame and
#: is shown to people; the start of it is cut).
FAILURE_TAIL_CHARS: Final[int] = 1000
#: Lines buffered per follower before the oldest are dropped for that follower.
FOLLOWER_BUFFER: Final[int] = 1024
#: How long a backend's exit waits for the rest of its output, seconds. Its group
#: is killed when the exit is noticed, so the pipes reach end of file at once;
#: this only trips for a descendant that left the group and keeps them open.
DRAIN_AFTER_EXIT_S: Final[float] = 1.0


class OutputStream(enum.Enum):
    """Which of a backend's streams a line came from."""

    STDOUT = "stdout"
    STDERR = "stderr"


@attrs.frozen
class OutputLine:
    """One line a backend wrote (without its newline)."""

    service_name: str
    service_version: str
    pid: int
    stream: OutputStream
    text: str
    at_unix_ms: int
    #: The line was longer than ``MAX_LINE_BYTES``; the rest of it was dropped.
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "service_name": self.service_name,
            "service_version": self.service_version,
            "pid": self.pid,
            "stream": self.stream.value,
            "text": self.text,
            "at_unix_ms": self.at_unix_ms,
            "truncated": self.truncated,
        }


@attrs.frozen
class SplitLine:
    """A line out of ``LineSplitter``."""

    text: str
    truncated: bool = False


class LineSplitter:
    """Cuts bytes into lines of at most ``max_bytes`` (sans-IO; holds at most that many)."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._partial = bytearray()
        #: Inside an over-long line, after its kept part: drop up to the newline.
        self._skipping = False

    def feed(self, data: bytes | bytearray) -> list[SplitLine]:
        """The lines ``data`` completes (a line cut at the bound counts as complete)."""
        lines: list[SplitLine] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if self._skipping:
                if newline >= 0:
                    self._skipping = False
                start = end + 1
                continue
            room = self._max - len(self._partial)
            if end - start > room:
                self._partial += data[start : start + room]
                lines.append(SplitLine(self._take(), truncated=True))
                self._skipping = newline < 0
                start = end + 1
                continue
            self._partial += data[start:end]
            if newline >= 0:
                lines.append(SplitLine(self._take()))
            start = end + 1
        return lines

    def finish(self) -> list[SplitLine]:
        """At end of file: the last line, if it had no newline."""
        if not self._partial:
            return []
        return [SplitLine(self._take())]

    def _take(self) -> str:
        text = bytes(self._partial).decode("utf-8", errors="replace").removesuffix("\r")
        self._partial.clear()
        return text


class LineFollower:
    """Lines of one service from the moment of following, as an async iterator.

    Made by ``OutputLog.follow``. A follower that falls behind loses the oldest
    lines it has not read; ``take_dropped`` says how many since it was last asked.
    It ends when closed (``close``, leaving ``async with``, or dropping the last
    reference) or when the log is closed.
    """

    def __init__(self, log: OutputLog, service_name: str) -> None:
        self._log = log
        self.service_name = service_name
        self._queue: DroppingQueue[OutputLine] = DroppingQueue(FOLLOWER_BUFFER)

    @property
    def dropped(self) -> int:
        """Lines this follower lost by falling behind, in all."""
        return self._queue.dropped

    def _push(self, line: OutputLine) -> None:
        self._queue.push(line)

    def _end(self) -> None:
        self._queue.end()

    def take_dropped(self) -> int:
        """Lines lost since the last call (and reset the count)."""
        return self._queue.take_unreported()

    def __aiter__(self) -> LineFollower:
        return self

    async def __anext__(self) -> OutputLine:
        """The next line; ``StopAsyncIteration`` once closed and drained.

        Cancellation: just stops waiting; no line is lost.
        """
        return await self._queue.get()

    def close(self) -> None:
        """Stop following now (idempotent)."""
        self._log._unfollow(self)
        self._end()

    async def __aenter__(self) -> LineFollower:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class BackendOutput:
    """The kept lines of one backend incarnation (a ring buffer of both streams)."""

    def __init__(self, log: OutputLog, service_name: str, service_version: str, pid: int) -> None:
        self._log = log
        self.service_name = service_name
        self.service_version = service_version
        self.pid = pid
        self.lines: collections.deque[OutputLine] = collections.deque(maxlen=KEPT_LINES_PER_BACKEND)

    def record(self, stream: OutputStream, line: SplitLine) -> None:
        """Keep, log and pass on one line."""
        kept = OutputLine(
            service_name=self.service_name,
            service_version=self.service_version,
            pid=self.pid,
            stream=stream,
            text=line.text,
            at_unix_ms=int(time.time() * 1000),
            truncated=line.truncated,
        )
        self.lines.append(kept)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                KeyValues.of(
                    service=self.service_name,
                    version=self.service_version,
                    pid=self.pid,
                    stream=stream.value,
                    line=line.text,
                    truncated=True if line.truncated else None,
                )
            )
        self._log._publish(kept)

    def stderr_tail(self) -> str:
        """The last ``FAILURE_TAIL_LINES`` stderr lines, at most ``FAILURE_TAIL_CHARS``."""
        tail = [line.text for line in self.lines if line.stream is OutputStream.STDERR]
        text = "\n".join(tail[-FAILURE_TAIL_LINES:])
        if len(text) > FAILURE_TAIL_CHARS:
            text = "..." + text[-(FAILURE_TAIL_CHARS - 3) :]
        return text


class OutputLog:
    """The kept output of every backend (live, and the last few ended) plus followers."""

    def __init__(self) -> None:
        self._live: dict[BackendOutput, None] = {}
        self._ended: collections.deque[BackendOutput] = collections.deque(
            maxlen=KEPT_ENDED_BACKENDS
        )
        self._followers: weakref.WeakSet[LineFollower] = weakref.WeakSet()
        self._closed = False

    def open_backend(self, service_name: str, service_version: str, pid: int) -> BackendOutput:
        """A new backend's buffer (kept until it ends, then among the last ended)."""
        backend = BackendOutput(self, service_name, service_version, pid)
        self._live[backend] = None
        return backend

    def backend_ended(self, backend: BackendOutput) -> None:
        """``backend`` ended: its lines join those of the last few ended backends."""
        if backend in self._live:
            del self._live[backend]
            self._ended.append(backend)

    def _backends(self) -> Iterator[BackendOutput]:
        yield from self._ended
        yield from self._live

    def lines_of(self, service_name: str) -> list[OutputLine]:
        """Every kept line of ``service_name``'s backends, oldest first."""
        lines = [
            line
            for backend in self._backends()
            if backend.service_name == service_name
            for line in backend.lines
        ]
        lines.sort(key=lambda line: line.at_unix_ms)  # stable: each backend's order stays
        return lines

    def follow(self, service_name: str) -> LineFollower:
        """Every line of ``service_name``'s backends from now on (see ``LineFollower``)."""
        follower = LineFollower(self, service_name)
        if self._closed:
            follower._end()
        else:
            self._followers.add(follower)
        return follower

    @property
    def follower_count(self) -> int:
        """Followers still open (one that left is no longer counted)."""
        return len(self._followers)

    def _unfollow(self, follower: LineFollower) -> None:
        self._followers.discard(follower)

    def _publish(self, line: OutputLine) -> None:
        for follower in list(self._followers):
            if follower.service_name == line.service_name:
                follower._push(line)

    def close(self) -> None:
        """End every follower (their iterators finish once drained)."""
        self._closed = True
        for follower in list(self._followers):
            follower._end()
        self._followers.clear()


class OutputCapture:
    """The read ends of one backend's output pipes, and the tasks that drain them."""

    def __init__(self, output: transports.ChildOutput, backend: BackendOutput) -> None:
        self._output = output
        self.backend = backend
        #: Set once both streams reached end of file (or were closed).
        self.drained = trio.Event()

    async def run(self) -> None:
        """Drain both streams until end of file; then close them.

        Cancellation: stops reading and closes both streams (no descriptor left).
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, OutputStream.STDOUT, self._output.stdout)
                nursery.start_soon(self._pump, OutputStream.STDERR, self._output.stderr)
        finally:
            with trio.CancelScope(shield=True):  # closing a pipe end does not block
                await self.aclose()

    async def _pump(self, stream: OutputStream, receive: trio.abc.ReceiveStream) -> None:
        splitter = LineSplitter()
        while True:
            try:
                data = await receive.receive_some(READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                break
            for line in splitter.feed(data):
                self.backend.record(stream, line)
        for line in splitter.finish():
            self.backend.record(stream, line)

    async def wait_drained(self, timeout_s: float = DRAIN_AFTER_EXIT_S) -> None:
        """Wait, at most ``timeout_s``, until both streams reached end of file.

        Cancellation: just stops waiting.
        """
        with trio.move_on_after(timeout_s):
            await self.drained.wait()

    async def aclose(self) -> None:
        """Close both streams (idempotent). Cancellation: none (closing does not block)."""
        await trio.aclose_forcefully(self._output.stdout)
        await trio.aclose_forcefully(self._output.stderr)
        self.drained.set()
