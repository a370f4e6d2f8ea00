"""Connect to the echo service through a broker and round-trip one message.

Usage: python examples/client.py --socket PATH [--no-handoff] [--message TEXT]
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--no-handoff", action="store_true")
    parser.add_argument("--message", default="hello, broker")
    args = parser.parse_args()
    trio.run(main, args.socket, not args.no_handoff, args.message.encode())
