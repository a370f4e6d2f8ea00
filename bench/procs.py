"""The processes a benchmark measures, and the CPU time they spend.

What this does: starts a server process (the real broker ``rpbroker serve`` with
an echo service, the minimal responder, or a prototype) in a private temporary
directory and waits until it reports ``serving on``; finds the children it spawned
(the broker's backends); and reads the CPU time a process has used, summed over
its threads, from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds, the same
accounting as ``CLOCK_PROCESS_CPUTIME_ID``). A ``CpuMeter`` turns two readings of
several processes into microseconds per operation.

What it does not do: drive any load (``bench.route_client`` and
``bench.hello_load`` do), or work anywhere but Linux (``/proc`` is required; the
benchmark says so and stops).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ECHO_BACKEND = REPO / "examples" / "echo_backend.py"

#: How long a server may take to print ``serving on``, seconds: a cold interpreter
#: with protobuf imports takes well under one on this machine, even under load.
SERVER_START_TIMEOUT_S = 30.0
#: Poll interval while waiting for a server or its first child, seconds.
_POLL_S = 0.001


def process_cpu_ns(pid: int) -> int:
    """CPU time (user + system) ``pid`` has used so far, summed over its threads, ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between listdir and open
    return total


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's ``children`` list), without the
    broker's process-group reaper (an idle helper, not a backend)."""
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found.extend(int(c) for c in f.read().split())
    return [child for child in found if not _is_reaper(child)]


def _is_reaper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"_unix_reaper_program" in f.read()
    except OSError:
        return False


class CpuMeter:
    """CPU spent by named processes between ``start`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._before: dict[str, int] = {}

    def start(self) -> None:
        self._before = {name: process_cpu_ns(pid) for name, pid in self._pids.items()}

    def stop(self) -> dict[str, int]:
        """Nanoseconds each process used since ``start``."""
        return {name: process_cpu_ns(pid) - self._before[name] for name, pid in self._pids.items()}


class ServerProcess:
    """A server process in a private temporary directory, stopped with SIGTERM."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"rpb-bench-{name}-", dir="/tmp"))
        self.root.chmod(0o700)
        self.socket = str(self.root / "server.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_after_s = 0.0
        self._log = self.root / "stderr.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Run ``argv`` and wait until its stderr says ``serving on``."""
        started = time.perf_counter()
        with open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                list(argv), stderr=log, stdin=subprocess.DEVNULL, env=child_env(env)
            )
        deadline = started + SERVER_START_TIMEOUT_S
        while b"serving on" not in self._log.read_bytes():
            if self.process.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} failed to start: {self.stderr()}")
            time.sleep(_POLL_S)
        self.ready_after_s = time.perf_counter() - started

    def stderr(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def only_child(self) -> int:
        """The single child this server spawned (waits for it to appear)."""
        deadline = time.perf_counter() + SERVER_START_TIMEOUT_S
        while not (kids := children_of(self.pid)):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} spawned no child")
            time.sleep(_POLL_S)
        if len(kids) != 1:
            raise RuntimeError(f"{self.name} has {len(kids)} children, expected one")
        return kids[0]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class BrokerProcess(ServerProcess):
    """``rpbroker serve`` with one service, ``echo``, served by ``examples/echo_backend.py``."""

    def __init__(self) -> None:
        super().__init__("broker")
        services = self.root / "svc"
        services.mkdir(mode=0o700)
        definition = services / "echo.toml"
        definition.write_text(
            f'service_name = "echo"\ncommand = ["{sys.executable}", "{ECHO_BACKEND}"]\n'
            "idle_timeout_secs = 3600\n"
        )
        definition.chmod(0o600)  # definitions must be private to the broker's user
        self.services_dir = services

    def start_broker(self) -> None:
        self.start(
            [
                sys.executable,
                "-m",
                "rpbroker",
                "serve",
                "--socket",
                self.socket,
                "--services",
                str(self.services_dir),
                "--runtime-dir",
                str(self.root),
                "--log-level",
                "WARNING",
                "--hello-rate-limit",
                "100000000",
                "--hello-timeout",
                "600",
            ]
        )


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def require_linux_proc() -> None:
    """Stop with a clear message where ``/proc/<pid>/task/*/schedstat`` is missing."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists():
        raise SystemExit(
            "bench needs Linux /proc/<pid>/task/<tid>/schedstat to measure CPU per process"
        )
