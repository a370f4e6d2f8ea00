"""What a cancellation sweep found, as typed values and as a readable report.

What this module does: one ``RunResult`` per run (its cut point, how the target
ended, where the cut landed, what it left behind) and the ``SweepReport`` over
all runs: how the sweep ended, the first failure, totals per outcome, the number
of steps the target takes uncancelled, ``describe()`` for people and
``raise_for_failure()`` for pytest (a readable ``AssertionError``).

What it does not do: run anything or decide what is allowed (``_sweep`` decides
each outcome; this module only tells failures from the rest).
"""

from __future__ import annotations

import collections
import enum
import traceback

import attrs

from ._sweep_instrument import StepLanding
from ._sweep_leaks import BuiltinChecks, Leak
from ._sweep_steps import CountedTasks, SampleSteps
from ._sweep_tasks import StackEntry, TaskStack, innermost_own_frame, own_frames_text


@attrs.frozen
class RunCompleted:
    """The target returned normally.

    ``cancel_issued``: the cut came, but too late to stop it (after its last
    checkpoint, or while it was shielded up to its end).
    """

    cancel_issued: bool


@attrs.frozen
class RunCancelled:
    """The target raised ``trio.Cancelled`` (or a group holding only ``Cancelled``)."""

    #: The traceback of (the first) ``Cancelled``, outermost frame first.
    raised_at: tuple[StackEntry, ...]

    @property
    def where(self) -> StackEntry | None:
        return innermost_own_frame(self.raised_at)


@attrs.frozen
class RunRaisedAllowed:
    """The target raised one of the errors the caller allows (possibly beside ``Cancelled``)."""

    error: BaseException


@attrs.frozen
class RunFailed:
    """The target raised something it must not, or the sweep could not run it."""

    error: BaseException
    reason: str


class Unwinding(enum.Enum):
    """How a hung run ended after the sweep gave up on it."""

    #: It was blocked where a cancellation reaches: cancelling its scope ended it.
    AFTER_CANCEL = "ended once the sweep cancelled it"
    #: It ignored the cancellation (a shielded wait); lifting its shields ended it.
    AFTER_LIFTING_SHIELDS = "ended only after the sweep lifted its cancel shields"
    #: Nothing ended it; its tasks stay stuck and the trio run cannot finish.
    NEVER = "is still stuck: its tasks cannot be reclaimed and trio.run cannot finish"


@attrs.frozen
class RunHung:
    """The run was still going when its bound passed."""

    bound_s: float
    #: Every task of the run alive when the bound passed, with its stack.
    tasks: tuple[TaskStack, ...]
    unwinding: Unwinding


RunOutcome = RunCompleted | RunCancelled | RunRaisedAllowed | RunFailed | RunHung


class OutcomeKind(enum.Enum):
    """The outcome of a run, for totals."""

    COMPLETED = "completed"
    COMPLETED_AFTER_CUT = "completed although cut"
    CANCELLED = "cancelled"
    ALLOWED_ERROR = "raised an allowed error"
    FAILED = "failed"
    HUNG = "hung"


def outcome_kind(outcome: RunOutcome) -> OutcomeKind:
    match outcome:
        case RunCompleted(cancel_issued=True):
            return OutcomeKind.COMPLETED_AFTER_CUT
        case RunCompleted():
            return OutcomeKind.COMPLETED
        case RunCancelled():
            return OutcomeKind.CANCELLED
        case RunRaisedAllowed():
            return OutcomeKind.ALLOWED_ERROR
        case RunFailed():
            return OutcomeKind.FAILED
        case RunHung():
            return OutcomeKind.HUNG


@attrs.frozen
class RunResult:
    """One run of the target."""

    #: Cut after this counted step; ``None`` for the uncancelled warm-up run.
    cut_at: int | None
    #: Counted steps the target took in this run (on to its end, after the cut).
    steps: int
    outcome: RunOutcome
    #: Where the cut was made; ``None`` when the target finished before it.
    landing: StepLanding | None
    leaks: tuple[Leak, ...]

    @property
    def cancel_issued(self) -> bool:
        return self.landing is not None

    @property
    def failed(self) -> bool:
        return bool(self.leaks) or isinstance(self.outcome, RunFailed | RunHung)

    @property
    def label(self) -> str:
        return "warm-up run" if self.cut_at is None else f"run k={self.cut_at}"

    def describe(self) -> str:
        lines = [f"{self.label}: {_outcome_text(self.outcome)}"]
        if self.landing is not None:
            lines.append("  " + _landing_text(self.landing))
        match self.outcome:
            case RunCancelled(raised_at=raised_at) if raised_at:
                lines.append(f"  Cancelled raised at {own_frames_text(raised_at)}")
            case RunFailed(error=error) | RunRaisedAllowed(error=error):
                lines.extend(_indent(_format_error(error), "  | "))
            case RunHung(tasks=tasks):
                for task in tasks:
                    lines.append(f"  task {task.name!r} stuck at {own_frames_text(task.stack)}")
                    lines.append("    its stack:")
                    lines.extend(f"      {entry}" for entry in task.stack)
            case _:
                pass
        for leak in self.leaks:
            first, *more = str(leak).splitlines() or [""]
            lines.append(f"  leaked: {first}")
            lines.extend(_indent(more, "    "))
        return "\n".join(lines)


def _outcome_text(outcome: RunOutcome) -> str:
    match outcome:
        case RunFailed(reason=reason):
            return f"failed: {reason}"
        case RunHung(bound_s=bound_s, unwinding=unwinding):
            return (
                f"hung: still running at its bound (run_timeout_s={bound_s:g} on trio's clock);"
                f" it {unwinding.value}"
            )
        case RunRaisedAllowed(error=error):
            return f"raised an allowed {type(error).__name__}"
        case _:
            return outcome_kind(outcome).value


def _landing_text(landing: StepLanding) -> str:
    head = f"cut after step {landing.step} of task {landing.task.name!r}"
    if landing.finished:
        return f"{head}, which had just finished"
    return f"{head}, suspended at {own_frames_text(landing.task.stack)}"


def _format_error(error: BaseException) -> list[str]:
    return "".join(traceback.format_exception(error)).rstrip("\n").splitlines()


def _indent(lines: list[str], prefix: str) -> list[str]:
    return [prefix + line for line in lines]


class SweepEnd(enum.Enum):
    """Why a sweep stopped."""

    #: A run finished before its cut point: every cut point before it was swept.
    COMPLETED = "completed"
    #: A run failed; the sweep stopped there.
    FAILED = "failed"
    #: The next cut point would exceed ``SampleSteps.max_steps``.
    STEP_LIMIT = "step-limit"


@attrs.frozen
class SweepReport:
    """Every run of one sweep and how it ended."""

    target: str
    steps: SampleSteps
    counted: CountedTasks
    runs: tuple[RunResult, ...]
    end: SweepEnd
    #: Requested built-in checks this platform cannot make.
    unchecked: BuiltinChecks

    @property
    def ok(self) -> bool:
        return self.end is SweepEnd.COMPLETED

    @property
    def first_failure(self) -> RunResult | None:
        return next((run for run in self.runs if run.failed), None)

    @property
    def total_steps(self) -> int | None:
        """Counted steps of the run that finished uncut (``None`` if none did)."""
        if self.end is not SweepEnd.COMPLETED:
            return None
        return self.runs[-1].steps

    @property
    def cut_runs(self) -> tuple[RunResult, ...]:
        """The runs with a cut point (all but the warm-up)."""
        return tuple(run for run in self.runs if run.cut_at is not None)

    def totals(self) -> dict[OutcomeKind, int]:
        """How many runs ended each way (warm-up included)."""
        counts = collections.Counter(outcome_kind(run.outcome) for run in self.runs)
        return {kind: counts[kind] for kind in OutcomeKind if counts[kind]}

    def describe(self) -> str:
        counted = self.counted.value.replace("-", " ")
        totals = ", ".join(f"{kind.value} {n}" for kind, n in self.totals().items())
        lines = []
        failure = self.first_failure
        if self.end is SweepEnd.COMPLETED:
            lines.append(
                f"cancellation sweep of {self.target}: clean; the target takes "
                f"{self.total_steps} steps uncancelled"
            )
        elif failure is not None:
            lines.append(f"cancellation sweep of {self.target}: FAILED at {failure.label}")
        else:
            lines.append(
                f"cancellation sweep of {self.target}: INCOMPLETE: still running after "
                f"{self.steps.max_steps} steps (raise SampleSteps.max_steps or sample "
                "with a stride)"
            )
        lines.append(f"  cut points: {self.steps.describe()}; counting steps of the {counted}")
        lines.append(f"  runs: {len(self.runs)} ({totals})")
        if self.unchecked:
            names = ", ".join(flag.name or "" for flag in BuiltinChecks if flag in self.unchecked)
            lines.append(f"  not checked on this platform: {names.lower()}")
        if failure is not None:
            lines.extend(_indent(failure.describe().splitlines(), "  "))
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """``AssertionError`` with ``describe()`` unless the sweep is clean."""
        if not self.ok:
            raise AssertionError(self.describe())
