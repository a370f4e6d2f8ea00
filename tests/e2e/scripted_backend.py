"""A backend process for end-to-end tests whose behaviour is chosen by environment.

``RPB_TEST_MODE`` selects it:
- ``echo``: the real SDK with an echo handler (the default);
- ``exit-before-ready``: exits with status 3 before reporting ready;
- ``traceback-before-ready``: writes a line to stdout, then dies of an uncaught
  ``RuntimeError`` (a traceback on stderr) before reporting ready;
- ``noisy``: the SDK echo backend, after writing a line to each stream, a line of
  ``NOISY_LONG_LINE_BYTES`` bytes, a last partial line, and ``NOISY_FLOOD_BYTES``
  of newline-free output (far more than a pipe holds) to stdout;
- ``crash-after-ready``: reports ready through the SDK, then exits with a failure
  status (trio wraps the ``SystemExit(4)`` in an exception group, so it is 1);
- ``reject``: raw control loop; refuses every offer (tells the client, ACKs false);
- ``never-ack``: raw; holds the passed connection and never answers;
- ``die-on-offer``: raw; exits as soon as an offer with a connection arrives;
- ``forged-ack``: raw; tells the client nothing and ACKs with a wrong token;
- ``wait-gate``: the SDK echo backend, but only after a byte arrives on the FIFO
  named by ``RPB_TEST_GATE`` (lets a test hold a spawn in progress);
- ``grandchild``: the SDK echo backend, after starting a child of its own that
  stays in its process group and appending "<backend pid> <grandchild pid>" to the
  file named by ``RPB_TEST_PIDS``.
Raw modes still serve the reconnect route with an echo server, so a client that
falls back gets a working connection. ``RPB_TEST_COUNTER`` names a file to which
every received chunk is appended (to prove data is never delivered twice).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from functools import partial

import trio

import transports
from rpbroker import control
from rpbroker.backend import serve_backend
from rpbroker.launcher import ENV_ENDPOINT, ENV_SERVICE_NAME, ENV_SERVICE_VERSION
from rpbroker.policy.broadcast import Quiesce
from rpbroker.wire.framing import MAX_FRAME_BYTES

MODE = os.environ.get("RPB_TEST_MODE", "echo")
#: ``noisy``: bytes of the over-long line, and of the newline-free flood.
NOISY_LONG_LINE_BYTES = 10_000
NOISY_FLOOD_BYTES = 2_000_000
COUNTER = os.environ.get("RPB_TEST_COUNTER")


async def echo(stream: trio.abc.Stream) -> None:
    # A client that leaves mid-exchange (cancelled) is not a handler failure.
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await stream.receive_some():
            if COUNTER:
                with open(COUNTER, "ab") as f:
                    f.write(data)
            await stream.send_all(data)


async def raw_backend() -> None:
    channel = await transports.open_inherited_control_channel()
    listener = await transports.open_listener(os.environ[ENV_ENDPOINT])
    held: list[trio.abc.Stream] = []

    async def accept_loop(nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            nursery.start_soon(serve, stream)

    async def serve(stream: trio.abc.Stream) -> None:
        async with stream:
            await echo(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, nursery)
        await channel.send_message(
            control.ready_message(
                os.environ[ENV_ENDPOINT],
                os.getpid(),
                os.environ[ENV_SERVICE_NAME],
                os.environ[ENV_SERVICE_VERSION],
            )
        )
        while True:
            try:
                message = await channel.receive_message(MAX_FRAME_BYTES)
            except transports.ChannelClosedError:
                nursery.cancel_scope.cancel()
                return
            inbound = control.parse(message.framed)
            if not isinstance(inbound, control.OfferNotice):
                if isinstance(inbound, control.BroadcastNotice):
                    await channel.send_message(control.broadcast_reply(inbound.operation_id, None))
                    if isinstance(inbound.operation, Quiesce):
                        nursery.cancel_scope.cancel()
                        return
                continue
            offer = inbound.offer
            passed = message.passed
            if MODE == "die-on-offer":
                os._exit(5)
            if MODE == "never-ack":
                if passed is not None:
                    held.append(passed.stream)
                continue
            if MODE == "reject":
                if passed is not None:
                    await passed.stream.send_all(
                        control.handoff_ready_event(
                            token=bytes(offer.token),
                            accepted=False,
                            detail="test backend refuses",
                            correlation_id=offer.correlation_id,
                        )
                    )
                    await passed.stream.aclose()
                await channel.send_message(
                    control.handoff_reply(
                        token=bytes(offer.token),
                        accepted=False,
                        detail="test backend refuses",
                        correlation_id=offer.correlation_id,
                    )
                )
            elif MODE == "forged-ack":
                if passed is not None:
                    await passed.stream.aclose()
                await channel.send_message(
                    control.handoff_reply(
                        token=b"\xee" * 16,
                        accepted=True,
                        detail="",
                        correlation_id=offer.correlation_id,
                    )
                )


async def gated() -> None:
    gate = os.environ["RPB_TEST_GATE"]
    await trio.to_thread.run_sync(_read_gate, gate)
    await serve_backend(echo)


def _read_gate(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


async def slow_release(prefix: str) -> None:
    await trio.sleep(float(os.environ.get("RPB_TEST_HOOK_SLEEP", "30")))


async def failing_release(prefix: str) -> None:
    raise RuntimeError(f"scripted failure releasing {prefix}")


async def barrier_release(prefix: str) -> None:
    directory = os.environ["RPB_TEST_BARRIER"]
    expected = int(os.environ["RPB_TEST_BARRIER_COUNT"])
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass
    # The other backends live in other processes: nothing to wait on but the directory.
    while len(os.listdir(directory)) < expected:
        await trio.sleep(0.01)


RELEASE_HOOKS = {
    "broadcast-slow": slow_release,
    "broadcast-fail": failing_release,
    "broadcast-barrier": barrier_release,
}


def noisy() -> None:
    print("hello from stdout", flush=True)
    print("hello from stderr", file=sys.stderr, flush=True)
    print("L" * NOISY_LONG_LINE_BYTES, file=sys.stderr, flush=True)
    print("after the long line", file=sys.stderr, flush=True)
    sys.stdout.write("F" * NOISY_FLOOD_BYTES)
    sys.stdout.write("\nflood done\n")
    sys.stdout.flush()


def main() -> None:
    if MODE == "exit-before-ready":
        sys.exit(3)
    if MODE == "traceback-before-ready":
        print("loading the configuration", flush=True)
        raise RuntimeError("configuration file /nonexistent/app.toml is missing")
    if MODE == "noisy":
        noisy()
        trio.run(serve_backend, echo)
        return
    if MODE == "crash-after-ready":

        async def crash_after_ready() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_backend, echo)
                sys.exit(4)

        trio.run(crash_after_ready)
        return
    if MODE == "wait-gate":
        trio.run(gated)
        return
    if MODE == "echo":
        trio.run(serve_backend, echo)
        return
    if MODE == "grandchild":
        grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        with open(os.environ["RPB_TEST_PIDS"], "a") as f:
            f.write(f"{os.getpid()} {grandchild.pid}\n")
        trio.run(serve_backend, echo)
        return
    if MODE in RELEASE_HOOKS:
        trio.run(partial(serve_backend, echo, on_release_handles=RELEASE_HOOKS[MODE]))
        return
    trio.run(raw_backend)


if __name__ == "__main__":
    main()
