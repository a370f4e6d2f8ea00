"""Connect to the echo service through a broker and round-trip one message.

Usage: python examples/client.py --socket PATH [--no-handoff] [--blocking] [--message TEXT]

By default it uses the trio client (``rpbroker.connect``); ``--blocking`` uses the
blocking client (``rpbroker.BlockingClient``, plain sockets, no trio run) instead.
"""

from __future__ import annotations

import argparse

import trio

import rpbroker


async def main(socket: str, handoff: bool, message: bytes) -> None:
    async with rpbroker.connect(
        "echo", "1.0.0", broker=socket, handoff=handoff, initial_data=message
    ) as stream:
        reply = b""
        while len(reply) < len(message):
            chunk = await stream.receive_some()
            if not chunk:
                break
            reply += chunk
        print(f"route={stream.route.value} reply={reply.decode()!r}")


def main_blocking(socket: str, handoff: bool, message: bytes) -> None:
    client = rpbroker.BlockingClient()
    with client.open(
        "echo", "1.0.0", broker=socket, handoff=handoff, initial_data=message
    ) as brokered:
        reply = b""
        while len(reply) < len(message):
            chunk = brokered.socket.recv(len(message) - len(reply))
            if not chunk:
                break
            reply += chunk
        print(f"route={brokered.route.value} reply={reply.decode()!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--no-handoff", action="store_true")
    parser.add_argument("--blocking", action="store_true", help="use the blocking client")
    parser.add_argument("--message", default="hello, broker")
    args = parser.parse_args()
    if args.blocking:
        main_blocking(args.socket, not args.no_handoff, args.message.encode())
    else:
        trio.run(main, args.socket, not args.no_handoff, args.message.encode())
