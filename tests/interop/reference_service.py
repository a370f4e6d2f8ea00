"""A reference ``running_process_service.ServiceServer``: the foreign backend of the interop tests.

Usage: ``python reference_service.py NAME RUNTIME_DIR``. The endpoint is derived
by the reference from NAME, RUNTIME_DIR and ``$XDG_RUNTIME_DIR``
(``$XDG_RUNTIME_DIR/running-process/broker-v2/rp-svc-NAME-<fnv1a32(RUNTIME_DIR)>.sock``);
the identity file is ``RUNTIME_DIR/NAME.identity.json``. Once bound it prints
``ready <pid> <endpoint>`` and answers requests on payload protocol 0xF0B7 with
``pong:`` + payload; the reference itself answers the 0xB232 endpoint probe on
the same endpoint. SIGINT or SIGTERM stop it cleanly: the endpoint and the
identity file are removed (the reference alone dies at once on SIGTERM and
leaves both behind).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from running_process_service import ServiceServer, ServiceSpec

#: Frame lane of the service's own requests: a private-use id (0xF000-0xFFFF), as the
#: reference requires.
PAYLOAD_PROTOCOL = 0xF0B7
#: How long one ``recv`` waits before checking for a stop request, seconds.
RECV_POLL_S = 0.1


def main(name: str, runtime_dir: str) -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    spec = ServiceSpec(
        name=name, version="1.0.0", payload_protocol=PAYLOAD_PROTOCOL, runtime_dir=runtime_dir
    )
    with ServiceServer(spec) as server:
        print(f"ready {os.getpid()} {spec.endpoint}", flush=True)
        while not stop.is_set():
            request = server.recv(RECV_POLL_S)
            if request is not None:
                request.reply(b"pong:" + request.payload)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
