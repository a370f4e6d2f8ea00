"""A foreign backend for the e2e tests: a plain Unix socket echo server, no rpbroker code.

Usage: ``python foreign_echo.py MODE ENDPOINT``. ``serve``: bind ENDPOINT (given by
the broker through ``{endpoint}``), echo every connection's bytes, and on SIGTERM
remove the socket and exit 0. ``never-ready``: bind nothing and sleep until
killed. ``exit``: exit with status 3 at once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time


def serve(endpoint: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(endpoint)
    listener.listen(16)
    listener.settimeout(0.1)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    listener.close()
    os.unlink(endpoint)


if __name__ == "__main__":
    mode, endpoint = sys.argv[1], sys.argv[2]
    if mode == "serve":
        serve(endpoint)
    elif mode == "never-ready":
        while True:
            time.sleep(60)
    else:
        sys.exit(3)
