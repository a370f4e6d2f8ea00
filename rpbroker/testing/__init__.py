"""Testing kit: a real broker over in-process fake backends, for your own tests.

What it does
------------
- ``open_test_broker(tmp_path, services)`` runs the real broker (``open_broker``:
  the real Hello path, supervisor, crash recovery, spawn budget, handoff
  orchestration, broadcasts, idle quiesce, graceful shutdown) in your test, with
  a private services directory and a short private runtime directory. Instead of
  starting processes it uses ``FakeLauncher``, which runs every backend as a trio
  task in the same process. The yielded ``TestBroker`` offers ``connect``
  (the real client), ``hello`` (one raw Hello), ``start_backend`` (spawn without
  a client), ``wait_event`` and ``events`` (every lifecycle event with the
  ``trio.current_time()`` it was emitted at).
- Fake backends run the backend SDK's own core (offer checks, handoff-ready
  EVENT, ACK, probe, activity reports, quiesce drain) with a ``FakeBackendScript``
  applied: how broadcasts are answered (``ACK``, ``TIMEOUT``, ``DEAD`` or a
  ``BroadcastFailure``), whether quiesce makes it exit, exiting before ready, a
  readiness delay, how handoffs are treated (``HandoffBehaviour``) and the
  connection handler (echo by default). Each fake listens on its real endpoint,
  so reconnect-route clients work. ``FakeBackend.crash(status)`` simulates a crash.
- ``fanout_benchmark(count)``: broadcast fan-out to many fakes (used by ``bench``).
- ``sweep_cancellation(target, *args)`` / ``assert_sweep_clean(...)``: cancel any
  async code of yours after its 1st, 2nd, ... scheduler step and check after each
  run that no descriptor, child process or task was left and that your own
  invariants hold; hangs (even shielded ones) are reported with the stuck tasks'
  stacks. Works with real processes and sockets and under ``MockClock``. See
  ``rpbroker.testing._sweep`` for the design and its limits.
- The pieces are usable alone: ``memory_control_pair`` (an in-memory
  ``transports.ControlChannel`` pair that passes ``dup()``-ed sockets),
  ``FakeProcess`` (a ``transports.ChildProcess`` the test controls) and
  ``FakeLauncher`` (a ``BackendLauncher``).

Everything runs on trio's clock, so tests may use
``trio.testing.MockClock(autojump_threshold=0)``: request pytest-trio's
``autojump_clock`` fixture in the test function. Time then jumps whenever every
task is blocked, so back-off windows, ACK deadlines, broadcast timeouts and idle
timeouts take no real time, and ``trio.current_time()`` differences are exact
(compare with a tolerance such as a microsecond: the clock is a float sum).
Nothing in the kit waits on a real process or thread. Like real processes, fakes
ignore the cancellation of the test's scopes: only an exit (crash, kill, or
their own) ends them.

What it does not do
-------------------
- Run your backend program, its command line or environment: definitions get a
  placeholder command that is never executed. Test a real backend end to end
  with ``rpbroker.open_broker`` instead.
- Simulate the operating system's failures (fd exhaustion, ``SCM_RIGHTS``
  errors, permission problems). ``MemoryControlChannel.fail_next_pass`` injects a
  passing failure by hand.
- Move wall-clock time. The few wall-clock values in the protocol (a Hello's
  ``deadline_unix_ms``, a handoff offer's adoption deadline, events'
  ``at_unix_ms``) stay real; under ``MockClock`` a virtual delay never expires
  them. ``TestBroker.hello`` sends no Hello deadline, so the broker's own
  ``hello_wait_timeout_s`` (virtual) bounds it.
- Hand off connections on Windows: the in-memory channel passes only
  ``trio.SocketStream`` connections (by ``socket.dup()``), so there every handoff
  falls back to the reconnect route, as the broker does when passing fails.
- Provide isolation between brokers in one test beyond their own directories:
  fakes run in your process, so a handler that blocks the event loop blocks
  everything.

Pitfalls under ``MockClock``: virtual time passes quickly, so a backend left
idle in a long test is quiesced after its ``idle_timeout_secs`` (30 s by
default; set ``FakeService(idle_timeout_secs=...)``), and all Hellos happen at
the same virtual instant (the per-peer Hello rate limit, 256 per second, counts
them together; raise ``hello_rate_limit`` for bulk tests or use
``start_backend``). ``wait_event`` resumes after the event it last returned;
pass ``since=test_broker.mark()`` taken before an action to wait for what that
action causes.

pytest fixtures: ``rpbroker.testing.pytest_plugin``, loaded automatically by
pytest wherever rpbroker is installed (or list it in ``pytest_plugins`` in your
top-level ``conftest.py`` when plugin autoloading is disabled).
"""

from __future__ import annotations

from ._backend import (
    ACK,
    DEAD,
    TIMEOUT,
    BroadcastResponse,
    Dies,
    FakeBackend,
    FakeBackendScript,
    HandoffBehaviour,
    echo_handler,
)
from ._broker import (
    PLACEHOLDER_COMMAND,
    TEST_EVENT_LOG_SIZE,
    FakeService,
    RecordedEvent,
    TestBroker,
    open_test_broker,
)
from ._channel import MemoryControlChannel, memory_control_pair
from ._fanout import FANOUT_OPERATION, fanout_benchmark
from ._launcher import FakeLauncher
from ._process import FIRST_FAKE_PID, KILLED_STATUS, TERMINATED_STATUS, FakeProcess
from ._sweep import (
    DEFAULT_RUN_TIMEOUT_S,
    DEFAULT_VIRTUAL_RUN_TIMEOUT_S,
    SweepOptions,
    assert_sweep_clean,
    sweep_cancellation,
)
from ._sweep_instrument import StepLanding
from ._sweep_leaks import (
    BrokenInvariant,
    BuiltinChecks,
    Invariant,
    Leak,
    LeakedChild,
    LeakedFd,
    LeakedTask,
)
from ._sweep_report import (
    OutcomeKind,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunHung,
    RunOutcome,
    RunRaisedAllowed,
    RunResult,
    SweepEnd,
    SweepReport,
    Unwinding,
)
from ._sweep_steps import (
    DEFAULT_MAX_STEPS,
    EVERY_STEP,
    SWEEP_ENV,
    CountedTasks,
    SampleSteps,
    SweepDepth,
    SweepUsageError,
    steps_from_environment,
    sweep_depth_from_environment,
)
from ._sweep_tasks import StackEntry, TaskStack

__all__ = [
    "ACK",
    "DEAD",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_RUN_TIMEOUT_S",
    "DEFAULT_VIRTUAL_RUN_TIMEOUT_S",
    "EVERY_STEP",
    "FANOUT_OPERATION",
    "FIRST_FAKE_PID",
    "PLACEHOLDER_COMMAND",
    "SWEEP_ENV",
    "TERMINATED_STATUS",
    "TEST_EVENT_LOG_SIZE",
    "TIMEOUT",
    "BroadcastResponse",
    "BrokenInvariant",
    "BuiltinChecks",
    "CountedTasks",
    "Dies",
    "FakeBackend",
    "FakeBackendScript",
    "FakeLauncher",
    "FakeProcess",
    "FakeService",
    "HandoffBehaviour",
    "Invariant",
    "KILLED_STATUS",
    "Leak",
    "LeakedChild",
    "LeakedFd",
    "LeakedTask",
    "MemoryControlChannel",
    "OutcomeKind",
    "RecordedEvent",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunHung",
    "RunOutcome",
    "RunRaisedAllowed",
    "RunResult",
    "SampleSteps",
    "StackEntry",
    "StepLanding",
    "SweepDepth",
    "SweepEnd",
    "SweepOptions",
    "SweepReport",
    "SweepUsageError",
    "TaskStack",
    "TestBroker",
    "Unwinding",
    "assert_sweep_clean",
    "echo_handler",
    "fanout_benchmark",
    "memory_control_pair",
    "open_test_broker",
    "steps_from_environment",
    "sweep_cancellation",
    "sweep_depth_from_environment",
]
