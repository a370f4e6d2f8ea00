"""``FakeLauncher``: a ``BackendLauncher`` that starts fake backends in-process."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Mapping

import trio

import transports
from rpbroker.launcher import LaunchedBackend, LaunchRequest

from ._backend import FakeBackend, FakeBackendScript
from ._channel import memory_control_pair
from ._process import FakeProcess


class FakeLauncher:
    """Starts a ``FakeBackend`` per launch, each in a nursery this launcher owns.

    Use it as ``async with FakeLauncher(scripts) as launcher:`` and pass it to
    ``open_broker(config, launcher=launcher)`` *inside* that block (the broker must
    stop before the launcher's nursery closes). Leaving the block kills every fake
    still alive (exit status -9) and waits until each has released its endpoint,
    channel and connections.

    The script of a launch is, in order: ``script_for(request)`` when given and
    not ``None``, then ``scripts[request.service_name]``, then ``default``.
    ``scripts`` is a plain dict: change it between launches to change what the
    next incarnation does (for example a respawn after a crash).
    """

    def __init__(
        self,
        scripts: Mapping[str, FakeBackendScript] | None = None,
        default: FakeBackendScript | None = None,
        *,
        script_for: Callable[[LaunchRequest], FakeBackendScript | None] | None = None,
    ) -> None:
        self.scripts: dict[str, FakeBackendScript] = dict(scripts or {})
        self.default = default if default is not None else FakeBackendScript()
        self._script_for = script_for
        self.history: list[FakeBackend] = []
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._changed = trio.Event()

    # -- context management ---------------------------------------------------------

    async def __aenter__(self) -> FakeLauncher:
        """Open the nursery the fakes run in. Cancellation: nothing is opened if cancelled."""
        if self._stack is not None:
            raise RuntimeError("a FakeLauncher can be entered only once")
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool | None:
        """Kill every live fake, then close the nursery once they have all ended.

        Cancellation: the fakes are killed synchronously, so cancelling the wait
        for their cleanup (which is shielded inside each fake) leaks nothing.
        """
        assert self._stack is not None
        self.kill_all()
        self._nursery = None
        return await self._stack.__aexit__(exc_type, exc, tb)

    # -- BackendLauncher ----------------------------------------------------------------

    def script_for(self, request: LaunchRequest) -> FakeBackendScript:
        """The script the next launch for ``request`` uses."""
        if self._script_for is not None:
            chosen = self._script_for(request)
            if chosen is not None:
                return chosen
        return self.scripts.get(request.service_name, self.default)

    async def launch(self, request: LaunchRequest) -> LaunchedBackend:
        """Start a fake backend for ``request``; return its process and the broker's channel end.

        Raises ``transports.SpawnError`` when the script says so, and
        ``RuntimeError`` outside ``async with``.

        Cancellation: a launch cancelled before it starts leaves nothing behind;
        once the fake has started the call completes (it does not block).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._nursery is None:
            raise RuntimeError(
                "use 'async with FakeLauncher(...)' before starting a broker with it"
            )
        script = self.script_for(request)
        if script.spawn_error is not None:
            raise transports.SpawnError(script.spawn_error)
        process = FakeProcess(terminate_exits=script.exit_on_terminate)
        broker_end, backend_end = memory_control_pair(backend_pid=process.pid)
        fake = FakeBackend(request, script, process, backend_end, self._notify)
        self.history.append(fake)
        self._nursery.start_soon(
            fake.run, name=f"fake backend {request.service_name} {process.pid}"
        )
        self._notify()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return LaunchedBackend(process=process, channel=broker_end)

    # -- inspection ----------------------------------------------------------------------

    @property
    def backends(self) -> list[FakeBackend]:
        """The fakes whose process is alive, in launch order."""
        return [fake for fake in self.history if fake.alive]

    def live(self, service_name: str, service_version: str | None = None) -> list[FakeBackend]:
        """Live fakes of ``service_name`` (and ``service_version`` when given)."""
        return [
            fake
            for fake in self.backends
            if fake.service_name == service_name
            and (service_version is None or fake.service_version == service_version)
        ]

    def backend(self, service_name: str, service_version: str | None = None) -> FakeBackend:
        """The one live fake of ``service_name``; ``LookupError`` unless there is exactly one."""
        found = self.live(service_name, service_version)
        if len(found) != 1:
            raise LookupError(
                f"expected one live fake backend for {service_name!r}, found {len(found)}"
            )
        return found[0]

    def by_pid(self, pid: int) -> FakeBackend:
        """The fake (alive or not) with this pid; ``LookupError`` if none."""
        for fake in self.history:
            if fake.pid == pid:
                return fake
        raise LookupError(f"no fake backend has pid {pid}")

    def launches(self, service_name: str | None = None) -> list[FakeBackend]:
        """Every fake ever launched (of ``service_name`` when given), in order."""
        return [f for f in self.history if service_name is None or f.service_name == service_name]

    async def wait_backend(
        self, service_name: str, service_version: str | None = None, *, ready: bool = True
    ) -> FakeBackend:
        """Wait until a live fake of the service exists (and is ready, by default).

        Returns the most recently launched one. Cancellation: just stops waiting.
        """
        while True:
            found = [f for f in self.live(service_name, service_version) if f.ready or not ready]
            if found:
                await trio.lowlevel.checkpoint()
                return found[-1]
            await self._changed.wait()

    def kill_all(self) -> None:
        """Kill every live fake now (exit status -9)."""
        for fake in self.backends:
            fake.process.kill_tree()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
