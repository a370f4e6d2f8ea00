"""End-to-end demonstration, run by ``make demo``.

Starts the example broker (embedded with ``open_broker``) on a private temporary
directory, then:
  1. connects to the echo service by the handoff route and by the reconnect route,
     printing the route taken and the round-trip time of each;
  2. kills the echo backend and shows the broker respawning it with no client
     involved, then connects again;
  3. broadcasts release-handles to every live backend and prints the result;
  4. shuts down gracefully and checks that no backend process is left.
Every step checks what it claims and exits non-zero if something is off.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import private_services_copy

import rpbroker
from rpbroker.client import forget_cached_endpoints
from rpbroker.logfmt import configure_logging

MESSAGE = b"ping through the broker"


async def round_trip(socket: str, *, handoff: bool) -> tuple[rpbroker.Route, float]:
    forget_cached_endpoints()
    started = trio.current_time()
    async with rpbroker.connect(
        "echo", "1.0.0", broker=socket, handoff=handoff, initial_data=MESSAGE
    ) as stream:
        reply = b""
        while len(reply) < len(MESSAGE):
            chunk = await stream.receive_some()
            if not chunk:
                break
            reply += chunk
        elapsed = trio.current_time() - started
        if reply != MESSAGE:
            raise SystemExit(f"demo: echo returned {reply!r}")
        return stream.route, elapsed


async def wait_for_event(
    events: trio.MemoryReceiveChannel[rpbroker.LifecycleEvent], kind: rpbroker.EventKind
) -> rpbroker.LifecycleEvent:
    async for event in events:
        if event.kind is kind:
            return event
    raise SystemExit(f"demo: event stream ended before {kind.value}")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rpbroker-demo-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o700)
        config = rpbroker.BrokerConfig(
            services_dir=private_services_copy(workdir),
            socket_path=str(workdir / "broker.sock"),
            runtime_dir=workdir,
        )
        pids: set[int] = set()
        async with rpbroker.open_broker(config) as broker:
            print(f"broker: listening on {broker.socket_path}")
            send, receive = trio.open_memory_channel[rpbroker.LifecycleEvent](1000)

            async def pump() -> None:
                async for event in broker.iter_events():
                    await send.send(event)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                with trio.fail_after(30):
                    # Warm the backend first so both timings measure the route alone.
                    await round_trip(broker.socket_path, handoff=False)
                    for handoff in (True, False):
                        route, elapsed = await round_trip(broker.socket_path, handoff=handoff)
                        print(f"client: route={route.value:<9} round trip {elapsed * 1000:7.2f} ms")
                        expected = rpbroker.Route.HANDOFF if handoff else rpbroker.Route.RECONNECT
                        if route is not expected:
                            raise SystemExit(f"demo: expected {expected.value}, got {route.value}")

                    backend = next(iter(broker.backends))
                    pids.add(backend.pid)
                    print(f"crash: killing echo backend pid {backend.pid}")
                    os.kill(backend.pid, signal.SIGKILL)
                    crashed = await wait_for_event(receive, rpbroker.EventKind.CRASHED)
                    print(f"broker: {crashed.kind.value}: {crashed.reason}")
                    running = await wait_for_event(receive, rpbroker.EventKind.RUNNING)
                    pids.add(running.pid)
                    print(f"broker: respawned echo backend, pid {running.pid} (no client involved)")
                    route, elapsed = await round_trip(broker.socket_path, handoff=True)
                    print(f"client: after recovery route={route.value} {elapsed * 1000:.2f} ms")

                    result = await broker.broadcast(rpbroker.ReleaseHandles(str(workdir)))
                    print(
                        f"broadcast: release-handles acks={len(result.acks)} "
                        f"timeouts={len(result.timeouts)} failures={len(result.failures)} "
                        f"skipped_dead={len(result.skipped_dead)}"
                    )
                    if not result.all_live_backends_acked:
                        raise SystemExit("demo: a live backend did not acknowledge the broadcast")

                    print("shutdown: graceful (quiesce, drain, stop)")
                    await broker.shutdown()
                nursery.cancel_scope.cancel()
        leftovers = [pid for pid in pids if _alive(pid)]
        if leftovers:
            raise SystemExit(f"demo: backend processes outlived the broker: {leftovers}")
        print(f"shutdown: complete; socket removed: {not Path(config.socket_path or '').exists()}")
        print("demo: OK")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    # The broker's warnings (the crash below) come out as key=value lines on stderr.
    configure_logging(logging.WARNING)
    trio.run(main)
