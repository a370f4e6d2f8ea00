"""The sans-IO parts of backend output capture: line splitting, kept lines, followers."""

from __future__ import annotations

import trio

from rpbroker.supervisor.output import (
    FAILURE_TAIL_CHARS,
    FAILURE_TAIL_LINES,
    FOLLOWER_BUFFER,
    KEPT_ENDED_BACKENDS,
    KEPT_LINES_PER_BACKEND,
    LineSplitter,
    OutputLog,
    OutputStream,
    SplitLine,
)


def test_lines_split_across_chunks_and_a_carriage_return_is_dropped() -> None:
    splitter = LineSplitter(max_bytes=16)
    assert splitter.feed(b"one\r\ntw") == [SplitLine("one")]
    assert splitter.feed(b"o\nthr") == [SplitLine("two")]
    assert splitter.finish() == [SplitLine("thr")]
    assert splitter.finish() == []


def test_a_long_line_is_cut_and_the_rest_up_to_its_newline_dropped() -> None:
    splitter = LineSplitter(max_bytes=4)
    assert splitter.feed(b"abcdefgh") == [SplitLine("abcd", truncated=True)]
    assert splitter.feed(b"ijkl") == []  # still inside the long line: dropped
    assert splitter.feed(b"mn\nok\n") == [SplitLine("ok")]
    assert splitter.feed(b"abcd\n") == [SplitLine("abcd")]  # exactly the bound is whole


def test_undecodable_bytes_are_replaced_not_fatal() -> None:
    assert LineSplitter().feed(b"\xff\xfeok\n") == [SplitLine("\ufffd\ufffdok")]


def test_kept_lines_are_bounded_per_backend_and_ended_backends_are_remembered() -> None:
    log = OutputLog()
    first = log.open_backend("svc", "1.0.0", 10)
    for n in range(KEPT_LINES_PER_BACKEND + 5):
        first.record(OutputStream.STDOUT, SplitLine(f"line {n}"))
    kept = log.lines_of("svc")
    assert len(kept) == KEPT_LINES_PER_BACKEND
    assert kept[-1].text == f"line {KEPT_LINES_PER_BACKEND + 4}"
    log.backend_ended(first)
    assert log.lines_of("svc") == kept  # still there after the end
    for pid in range(KEPT_ENDED_BACKENDS):
        log.backend_ended(log.open_backend("other", "1.0.0", 100 + pid))
    assert log.lines_of("svc") == []  # pushed out by later ended backends
    assert log.lines_of("nobody") == []


def test_the_stderr_tail_is_the_last_stderr_lines_bounded_in_size() -> None:
    backend = OutputLog().open_backend("svc", "1.0.0", 10)
    assert backend.stderr_tail() == ""
    for n in range(FAILURE_TAIL_LINES + 3):
        backend.record(OutputStream.STDERR, SplitLine(f"err {n}"))
        backend.record(OutputStream.STDOUT, SplitLine(f"out {n}"))
    lines = backend.stderr_tail().splitlines()
    assert lines == [f"err {n}" for n in range(3, FAILURE_TAIL_LINES + 3)]
    backend.record(OutputStream.STDERR, SplitLine("x" * (FAILURE_TAIL_CHARS * 2)))
    tail = backend.stderr_tail()
    assert len(tail) == FAILURE_TAIL_CHARS and tail.startswith("...")


async def test_a_slow_follower_loses_the_oldest_lines_and_is_told_how_many() -> None:
    log = OutputLog()
    backend = log.open_backend("svc", "1.0.0", 10)
    other = log.open_backend("else", "1.0.0", 11)
    async with log.follow("svc") as follower:
        for n in range(FOLLOWER_BUFFER + 7):
            backend.record(OutputStream.STDOUT, SplitLine(str(n)))
            other.record(OutputStream.STDOUT, SplitLine("not followed"))
        first = await follower.__anext__()
        assert first.text == "7"
        assert follower.take_dropped() == 7 and follower.take_dropped() == 0
        assert follower.dropped == 7
    # Closed: what was buffered can still be read, then the iteration ends.
    rest = [line.text async for line in follower]
    assert rest[-1] == str(FOLLOWER_BUFFER + 6)
    backend.record(OutputStream.STDOUT, SplitLine("after close"))
    assert [line async for line in follower] == []


async def test_closing_the_log_ends_its_followers() -> None:
    log = OutputLog()
    follower = log.follow("svc")
    async with trio.open_nursery() as nursery:
        got: list[object] = []

        async def read() -> None:
            got.extend([line async for line in follower])

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        log.close()
    assert got == []
    assert [line async for line in log.follow("svc")] == []
