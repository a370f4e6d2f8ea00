"""Helpers for end-to-end tests: a private workspace, service files, process checks."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

import rpbroker
import transports
from rpbroker.events import EventKind

HERE = Path(__file__).resolve().parent
SCRIPTED_BACKEND = HERE / "scripted_backend.py"


@attrs.define
class Workspace:
    """A private directory tree for one test: services, runtime dir, broker socket."""

    root: Path
    services: Path
    runtime: Path

    @property
    def socket(self) -> str:
        return str(self.runtime / "broker.sock")

    def add_service(
        self,
        name: str,
        *,
        mode: str = "echo",
        handoff: bool = True,
        min_version: str | None = None,
        allow_list: tuple[str, ...] = (),
        idle_timeout_secs: float = 300,
        env: dict[str, str] | None = None,
    ) -> None:
        environment = {"RPB_TEST_MODE": mode, **(env or {})}
        lines = [
            f'service_name = "{name}"',
            f'command = ["{sys.executable}", "{SCRIPTED_BACKEND}"]',
            f"handoff = {'true' if handoff else 'false'}",
            f"idle_timeout_secs = {idle_timeout_secs}",
        ]
        if min_version:
            lines.append(f'min_version = "{min_version}"')
        if allow_list:
            lines.append("version_allow_list = [" + ", ".join(f'"{v}"' for v in allow_list) + "]")
        lines.append("[env]")
        lines.extend(f'{key} = "{value}"' for key, value in environment.items())
        path = self.services / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def config(self, **overrides: Any) -> rpbroker.BrokerConfig:
        values: dict[str, Any] = {
            "services_dir": self.services,
            "socket_path": self.socket,
            "runtime_dir": self.runtime,
        }
        values.update(overrides)
        return rpbroker.BrokerConfig(**values)


def make_workspace() -> Workspace:
    # Short paths: sun_path holds 107 bytes, pytest's tmp_path is too long.
    base = Path(os.environ.get("RPB_TEST_TMP", "/tmp"))
    root = Path(tempfile.mkdtemp(prefix="rpb-", dir=base))
    root.chmod(0o700)
    services = root / "svc"
    services.mkdir(mode=0o700)
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    return Workspace(root=root, services=services, runtime=runtime)


def remove_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    root.rmdir()


def child_pids() -> set[int]:
    """Pids of this process's living, unreaped children."""
    children = transports.child_processes()
    assert children is not None, "needs /proc"
    return set(children)


@attrs.frozen
class PendingHandoffs:
    """Handoff state the broker still holds: issued tokens and ACKs it waits for."""

    tokens: int
    acks: int


def pending_handoffs(broker: rpbroker.Broker) -> PendingHandoffs:
    """The broker's pending handoff tokens and ACKs (the one place that reads them)."""
    return PendingHandoffs(tokens=len(broker.handoff.tokens), acks=len(broker.handoff.acks))


def fd_count() -> int:
    count = transports.open_fd_count()
    assert count is not None
    return count


async def round_trip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send ``payload`` and read back exactly as many bytes (echo backends)."""
    await stream.send_all(payload)
    return await read_exactly(stream, len(payload))


async def read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def wait_for_event(broker: rpbroker.Broker, kind: EventKind) -> None:
    """Wait until ``kind`` has been emitted (now or already)."""
    async with trio.open_nursery() as nursery:
        seen = trio.Event()

        async def watch() -> None:
            async for event in broker.iter_events():
                if event.kind is kind:
                    seen.set()
                    return

        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        if any(e.kind is kind for e in broker.recent_events()):
            seen.set()
        await seen.wait()
        nursery.cancel_scope.cancel()
