"""The example broker script: a trio app embedding ``rpbroker.open_broker``.

Usage: python examples/broker.py [--socket PATH] [--services DIR] [--log-level LEVEL]
                                 [--log-format text|json]

Serves the services in ``DIR`` (default: a private copy of examples/services) until
SIGINT/SIGTERM, then shuts down gracefully, printing lifecycle events as they
happen.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
from pathlib import Path

import trio

import rpbroker
from rpbroker.logfmt import configure_logging, parse_format

HERE = Path(__file__).resolve().parent


def private_services_copy(workdir: Path) -> Path:
    """Copy examples/services into a 0700 directory with 0600 files (git does not keep modes)."""
    services = workdir / "services"
    shutil.copytree(HERE / "services", services)
    services.chmod(0o700)
    for definition in services.iterdir():
        definition.chmod(0o600)
    # The {services_dir}/../echo_backend.py placeholder must resolve next to it.
    shutil.copy(HERE / "echo_backend.py", workdir / "echo_backend.py")
    return services


async def print_events(broker: rpbroker.Broker) -> None:
    async for event in broker.iter_events():
        print(f"event: {event.kind.value} {event.service_name} {event.reason}".rstrip(), flush=True)


async def main(socket: str | None, services: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="rpbroker-example-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o700)
        config = rpbroker.BrokerConfig(
            services_dir=services or private_services_copy(workdir),
            socket_path=socket or str(workdir / "broker.sock"),
            runtime_dir=workdir,
        )
        async with rpbroker.open_broker(config) as broker:
            print(f"broker listening on {broker.socket_path}", flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(print_events, broker)
                nursery.start_soon(shutdown_on_signal, broker)
                # Ends on SIGINT/SIGTERM or an admin SHUTDOWN alike.
                await broker.wait_stopped()
                nursery.cancel_scope.cancel()


async def shutdown_on_signal(broker: rpbroker.Broker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            broker.request_shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", default=None)
    parser.add_argument("--services", type=Path, default=None)
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    parser.add_argument("--log-format", default="text", help="text (key=value) or json")
    args = parser.parse_args()
    configure_logging(args.log_level, parse_format(args.log_format))
    trio.run(main, args.socket, args.services)
