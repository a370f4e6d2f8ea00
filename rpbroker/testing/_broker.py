"""``open_test_broker``: a real broker over fake backends, ready for a test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Unpack

import attrs
import trio

import transports
from rpbroker.broker import Broker, open_broker
from rpbroker.client import (
    BrokeredStream,
    ConnectOptions,
    hello_frame,
    negotiated_or_raise,
    open_connection,
)
from rpbroker.config import BrokerConfig
from rpbroker.errors import BrokerProtocolError, BrokerUnavailableError, RefusedError
from rpbroker.events import EventKind, LifecycleEvent
from rpbroker.policy.hello import Refusal
from rpbroker.services import DEFAULT_IDLE_TIMEOUT_SECS, Isolation, load_service
from rpbroker.supervisor import BackendKey, Incarnation
from rpbroker.wire import HelloReply, Negotiated
from rpbroker.wire.frames import MalformedMessage, decode, decode_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, FramingError, TruncatedFrame, read_frame_body

from ._backend import FakeBackend, FakeBackendScript
from ._launcher import FakeLauncher

#: Events kept by a test broker's log unless ``event_log_size`` is overridden; large,
#: so ``TestBroker.events`` never misses one.
TEST_EVENT_LOG_SIZE = 1_000_000

#: The placeholder command written into each service definition (never run).
PLACEHOLDER_COMMAND = ("{python}", "-c", "pass")


@attrs.frozen(kw_only=True)
class FakeService:
    """A service definition for a test broker plus the script of its fake backends.

    The definition fields mean what they mean in a ``<name>.toml`` file; the
    command is a placeholder that the fake launcher never runs.
    """

    script: FakeBackendScript = attrs.field(factory=FakeBackendScript)
    handoff: bool = True
    idle_timeout_secs: float = DEFAULT_IDLE_TIMEOUT_SECS
    min_version: str | None = None
    version_allow_list: tuple[str, ...] = ()
    isolation: Isolation = Isolation.PRIVATE
    explicit_instance: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)

    def toml(self, name: str) -> str:
        """The ``<name>.toml`` text of this definition."""

        def s(value: str) -> str:
            return json.dumps(value)  # a JSON string is a valid TOML basic string

        lines = [
            f"service_name = {s(name)}",
            "command = [" + ", ".join(s(part) for part in PLACEHOLDER_COMMAND) + "]",
            f"handoff = {'true' if self.handoff else 'false'}",
            f"idle_timeout_secs = {float(self.idle_timeout_secs)!r}",
            f"isolation = {s(self.isolation.value)}",
        ]
        if self.min_version is not None:
            lines.append(f"min_version = {s(self.min_version)}")
        if self.version_allow_list:
            lines.append(
                "version_allow_list = [" + ", ".join(s(v) for v in self.version_allow_list) + "]"
            )
        if self.explicit_instance is not None:
            lines.append(f"explicit_instance = {s(self.explicit_instance)}")
        if self.env:
            lines.append("[env]")
            lines.extend(f"{s(key)} = {s(value)}" for key, value in self.env.items())
        return "\n".join(lines) + "\n"


@attrs.frozen
class RecordedEvent:
    """A lifecycle event with the ``trio.current_time()`` at which it was emitted.

    ``at`` is exact under ``trio.testing.MockClock`` (the recorder runs before the
    clock can move). ``index`` is the event's position in ``TestBroker.events``.
    """

    index: int
    at: float
    event: LifecycleEvent

    @property
    def kind(self) -> EventKind:
        return self.event.kind

    @property
    def pid(self) -> int:
        return self.event.pid

    @property
    def service_name(self) -> str:
        return self.event.service_name

    @property
    def service_version(self) -> str:
        return self.event.service_version

    @property
    def reason(self) -> str:
        return self.event.reason

    @property
    def details(self) -> Mapping[str, Any]:
        return self.event.details


class TestBroker:
    """A running broker over a ``FakeLauncher``, with helpers; made by ``open_test_broker``."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        config: BrokerConfig,
        launcher: FakeLauncher,
        root: Path,
    ) -> None:
        self.config = config
        self.launcher = launcher
        self.root = root
        self.services_dir = Path(config.services_dir)
        assert config.runtime_dir is not None and config.socket_path is not None
        self.runtime_dir = Path(config.runtime_dir)
        self.socket_path: str = config.socket_path
        #: Every lifecycle event so far, in order, with its trio time.
        self.events: list[RecordedEvent] = []
        self._broker: Broker | None = None
        self._cursor = 0
        self._new_events = trio.Event()
        self._recording_done = False
        self._recorded_ids: set[int] = set()  # the events are kept alive by self.events

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the test broker is not running")
        return self._broker

    # -- services -------------------------------------------------------------------

    def add_service(
        self, name: str, service: FakeService | FakeBackendScript | None = None
    ) -> None:
        """Write ``<name>.toml`` and set the script its fake backends use.

        Takes effect at the next Hello (the broker re-reads definitions).
        """
        if service is None:
            service = FakeService()
        elif isinstance(service, FakeBackendScript):
            service = FakeService(script=service)
        path = self.services_dir / f"{name}.toml"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(service.toml(name))
        temporary.chmod(0o600)  # definitions must be private to the broker's user
        temporary.replace(path)
        self.launcher.scripts[name] = service.script

    def set_script(self, name: str, script: FakeBackendScript) -> None:
        """Change the script the next fake backend of ``name`` is launched with."""
        self.launcher.scripts[name] = script

    # -- clients ------------------------------------------------------------------------

    async def connect(
        self, service: str, version: str, **options: Unpack[ConnectOptions]
    ) -> BrokeredStream:
        """``rpbroker.open_connection`` against this broker; the caller closes the stream.

        Raises what ``open_connection`` raises (``RefusedError``, ...).
        Cancellation: as ``open_connection``: nothing is left open.
        """
        options.setdefault("broker", self.socket_path)
        return await open_connection(service, version, **options)

    async def hello(
        self, service: str, version: str, *, deadline_unix_ms: int = 0, request_id: int = 1
    ) -> Negotiated:
        """Send one raw Hello (no handoff) and return the ``Negotiated`` reply.

        Unlike ``connect`` it sets no ``deadline_unix_ms`` unless asked, so the
        broker bounds the wait by ``hello_wait_timeout_s`` alone (exact under
        ``MockClock``). Raises ``RefusedError`` for a refusal,
        ``BrokerUnavailableError`` when no broker listens (or it closed without a
        reply) and ``BrokerProtocolError`` for a reply that is not a HelloReply.

        Cancellation: the connection is closed; nothing is left behind.
        """
        try:
            stream = await transports.connect(self.socket_path)
        except transports.TransportError as exc:
            raise BrokerUnavailableError(f"no broker at {self.socket_path}: {exc}") from exc
        async with stream:
            try:
                await stream.send_all(
                    hello_frame(
                        service,
                        version,
                        handoff=False,
                        request_id=request_id,
                        deadline_unix_ms=deadline_unix_ms,
                    )
                )
                body = await read_frame_body(stream, MAX_FRAME_BYTES)
            except (TruncatedFrame, trio.BrokenResourceError, OSError) as exc:
                raise BrokerUnavailableError(f"broker closed without a reply: {exc}") from exc
            except FramingError as exc:
                raise BrokerProtocolError(f"bad reply to a Hello: {exc}") from exc
        try:
            reply = decode(HelloReply, decode_frame(body).payload)
        except MalformedMessage as exc:
            raise BrokerProtocolError(f"bad reply to a Hello: {exc}") from exc
        return negotiated_or_raise(reply)

    # -- backends -------------------------------------------------------------------------

    def key(self, service: str, version: str) -> BackendKey:
        """The registry key of ``service`` at ``version`` (per its definition)."""
        spec = load_service(self.services_dir, service)
        return BackendKey(spec.instance_id, service, version)

    def handle(self, service: str, version: str) -> Incarnation | None:
        """The incarnation serving new Hellos for ``service`` at ``version``, if any."""
        return self.broker.backends.current(self.key(service, version))

    async def start_backend(self, service: str, version: str) -> FakeBackend:
        """Have the supervisor start (or find) the backend, without a client Hello.

        Goes through the same single-flight spawn, budget, crash-recovery and
        readiness rules as a Hello; returns the running fake. Raises
        ``RefusedError`` when the supervisor refuses.

        Cancellation: only this wait is abandoned; a spawn in progress goes on.
        """
        spec = load_service(self.services_dir, service)
        key = BackendKey(spec.instance_id, service, version)
        acquired = await self.broker.backends.acquire(key, spec)
        if isinstance(acquired, Refusal):
            raise RefusedError(
                acquired.code, acquired.reason, acquired.retry_after_ms, acquired.wire_details()
            )
        return self.launcher.by_pid(acquired.pid)

    # -- events --------------------------------------------------------------------------

    def mark(self) -> int:
        """The index the next event will get (a ``since`` for ``wait_event``)."""
        return len(self.events)

    def events_of(self, kind: EventKind, *, since: int = 0) -> list[RecordedEvent]:
        """Recorded events of ``kind`` with index ``>= since``."""
        return [r for r in self.events[since:] if r.kind is kind]

    async def wait_event(
        self,
        kind: EventKind,
        predicate: Callable[[LifecycleEvent], bool] | None = None,
        *,
        since: int | None = None,
    ) -> RecordedEvent:
        """Wait for the first event of ``kind`` (matching ``predicate``) at or after ``since``.

        ``since`` defaults to just after the event the previous ``wait_event`` call
        returned (0 at first), so successive calls see events in order: waiting
        for CRASHED and then RUNNING returns the RUNNING that followed the crash.
        Events already recorded count, so there is no race with an event emitted
        just before the call. Raises ``LookupError`` if the broker stops first.

        Cancellation: just stops waiting (wrap it in ``trio.fail_after``).
        """
        start = self._cursor if since is None else since
        while True:
            for record in self.events[start:]:
                if record.kind is kind and (predicate is None or predicate(record.event)):
                    self._cursor = record.index + 1
                    await trio.lowlevel.checkpoint()
                    return record
            start = max(start, len(self.events))
            if self._recording_done:
                raise LookupError(f"the broker stopped without a matching {kind.value} event")
            await self._new_events.wait()

    async def _record_events(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Record every event with its trio time until the broker's event log closes.

        The subscription only wakes the recorder; the events themselves are read
        from the broker's log, so a burst larger than a subscriber's buffer loses
        nothing (as long as the log holds it: see ``TEST_EVENT_LOG_SIZE``).
        """
        broker = self.broker
        wakeups = broker.iter_events()
        try:
            self._catch_up(broker)
            task_status.started()
            async for event in wakeups:
                if id(event) not in self._recorded_ids:  # else a catch-up already got it
                    self._catch_up(broker)
        finally:
            closer = getattr(wakeups, "aclose", None)
            if closer is not None:
                with trio.CancelScope(shield=True):
                    await closer()
            self._catch_up(broker)
            self._recording_done = True
            self._wake()

    def _catch_up(self, broker: Broker) -> None:
        recent = broker.recent_events()
        start = 0
        if self.events:
            last = self.events[-1].event
            for position in range(len(recent) - 1, -1, -1):
                if recent[position] is last:
                    start = position + 1
                    break
        if start >= len(recent):
            return
        now = trio.current_time()
        for event in recent[start:]:
            self.events.append(RecordedEvent(len(self.events), now, event))
            self._recorded_ids.add(id(event))
        self._wake()

    def _wake(self) -> None:
        self._new_events.set()
        self._new_events = trio.Event()


def _make_directories(tmp_path: os.PathLike[str] | str | None) -> tuple[Path, Path, Path]:
    """Create (root, services dir, runtime dir), all 0700; root is short and removable.

    Synchronous on purpose: a thread would let ``MockClock`` jump while it runs.
    """
    root = Path(tempfile.mkdtemp(prefix="rpbt-", dir=transports.short_temp_dir()))
    root.chmod(0o700)
    services_dir = Path(tmp_path) / "rpbroker-services" if tmp_path is not None else root / "svc"
    services_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    services_dir.chmod(0o700)
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    return root, services_dir, runtime


@contextlib.asynccontextmanager
async def open_test_broker(
    tmp_path: os.PathLike[str] | str | None = None,
    services: Mapping[str, FakeService | FakeBackendScript] | None = None,
    *,
    default_script: FakeBackendScript | None = None,
    **config_overrides: Any,
) -> AsyncIterator[TestBroker]:
    """Run a real broker whose backends are in-process fakes, for one test.

    Creates a private (0700) services directory (under ``tmp_path`` when given)
    with one definition per entry of ``services``, and a private runtime
    directory with a short path under ``/tmp`` for the broker and backend sockets
    (pytest's ``tmp_path`` is often too long for ``sun_path``). Then runs
    ``open_broker(config, launcher=FakeLauncher(...))`` and yields a
    ``TestBroker``. ``config_overrides`` are ``BrokerConfig`` fields.

    Leaving the block shuts the broker down gracefully (quiesce, drain, kill),
    then kills any fake still alive and removes the runtime directory.

    Cancellation: cancelling the surrounding scope does the same with trio
    semantics (the broker's shutdown is shielded and bounded by its drain
    timeout); no task, socket or fake process is left behind.
    """
    root, services_dir, runtime = _make_directories(tmp_path)
    try:
        values: dict[str, Any] = {
            "services_dir": services_dir,
            "socket_path": str(runtime / "broker.sock"),
            "runtime_dir": runtime,
            "event_log_size": TEST_EVENT_LOG_SIZE,
        }
        values.update(config_overrides)
        config = BrokerConfig(**values)
        launcher = FakeLauncher(default=default_script)
        test_broker = TestBroker(config=config, launcher=launcher, root=root)
        for name, service in (services or {}).items():
            test_broker.add_service(name, service)
        async with (
            launcher,
            trio.open_nursery() as recorder,
            open_broker(config, launcher=launcher) as broker,
        ):
            test_broker._broker = broker
            await recorder.start(test_broker._record_events)
            yield test_broker
    finally:
        shutil.rmtree(root, ignore_errors=True)
