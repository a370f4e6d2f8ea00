"""Start a reference ServiceServer and probe it with rpbroker's probe client.

Usage: ``python tests/interop/probe_reference_service.py``. Runs
``reference_service.py`` as a child in a private ``$XDG_RUNTIME_DIR``, waits for
it to bind, probes its endpoint (``rpbroker.probe_client.probe_endpoint``: v1
0xB232 round trip plus pid, executable, BLAKE3 and boot checks), prints the
verified identity and stops the child with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from rpbroker.probe_client import probe_endpoint

SERVICE = Path(__file__).resolve().parent / "reference_service.py"


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rpi-", dir="/tmp") as runtime:
        env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
        command = [sys.executable, str(SERVICE), "demo-svc", f"{runtime}/state"]
        process = await trio.lowlevel.open_process(command, env=env, stdout=subprocess.PIPE)
        assert process.stdout is not None
        async with process.stdout:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                if not chunk:
                    raise SystemExit("the reference service exited before binding")
                line += chunk
            _ready, pid, endpoint = line.decode().split()
            with trio.fail_after(5):
                identity = await probe_endpoint(endpoint)
            print(f"pid {pid} at {endpoint} verified:\n{identity}")
            process.send_signal(signal.SIGTERM)
            await process.wait()


if __name__ == "__main__":
    trio.run(main)
