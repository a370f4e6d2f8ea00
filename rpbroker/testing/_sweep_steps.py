"""Which steps a cancellation sweep cuts at, and whose steps it counts.

What this module does: ``SampleSteps`` names the cut points of a sweep (every
step up to a limit, then every ``stride``-th, never beyond ``max_steps``);
``CountedTasks`` says whose scheduler steps are counted; ``steps_from_environment``
picks every step or a sample from ``$RPBROKER_SWEEP``, so a project can run a
sampled sweep in its ordinary test run and a full one on demand (``make sweep``).

What it does not do: count or cancel anything (``_sweep_instrument`` does) or
decide when a sweep ends (``_sweep`` does: when the target finishes before its cut).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping

import attrs

from rpbroker.errors import BrokerError

#: Upper bound on the cut point of any sweep unless the caller says otherwise: a
#: target that is still running after this many counted steps is reported as too
#: long rather than swept for ever (the rpbroker client takes well under 100).
DEFAULT_MAX_STEPS = 10_000

#: The environment variable ``steps_from_environment`` reads.
SWEEP_ENV = "RPBROKER_SWEEP"


class SweepUsageError(BrokerError):
    """A cancellation sweep was asked for something it cannot do; the message says the fix."""


class CountedTasks(enum.Enum):
    """Whose scheduler steps count towards the cut point ``k``."""

    #: Only the task that runs the target (the target's own ``await`` chain).
    TARGET_TASK = "target-task"
    #: The target's task and every task started while the target ran by a task
    #: already counted, or in a nursery one of them owns; never unrelated tasks of the
    #: test (a broker started before the sweep, the test's own helpers).
    WHOLE_RUN = "whole-run"
    #: Every task of the trio run but the sweep's own: the target is cut while the
    #: rest of the program (an in-process server it talks to) is at each of its
    #: steps. Only the target is ever cancelled.
    EVERY_TASK = "every-task"


class SweepDepth(enum.Enum):
    """What ``$RPBROKER_SWEEP`` asks for."""

    SAMPLED = "sampled"
    FULL = "full"


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise SweepUsageError(f"SampleSteps.{attribute.name} must be at least 1, got {value}")


def _optional_at_least_one(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and value < 1:
        raise SweepUsageError(
            f"SampleSteps.{attribute.name} must be at least 1 (or None for every step), got {value}"
        )


@attrs.frozen
class SampleSteps:
    """Cut points ``k`` for a sweep: ``1 .. every_up_to``, then every ``stride``-th.

    ``SampleSteps()`` cuts at every step. ``SampleSteps(every_up_to=20, stride=10)``
    cuts at 1..20, 30, 40, ... A sweep stops at the first cut point the target
    finishes before, and fails when the next cut point would exceed ``max_steps``.
    """

    #: Cut at every step up to this one; ``None``: at every step, no stride.
    every_up_to: int | None = attrs.field(default=None, validator=_optional_at_least_one)
    #: Distance between cut points after ``every_up_to``.
    stride: int = attrs.field(default=1, validator=_at_least_one)
    #: No cut point beyond this step.
    max_steps: int = attrs.field(default=DEFAULT_MAX_STEPS, validator=_at_least_one)

    @property
    def is_every_step(self) -> bool:
        return self.every_up_to is None or self.stride == 1

    def cut_points(self) -> Iterator[int]:
        """The cut points in increasing order, up to ``max_steps``."""
        dense_until = self.max_steps if self.every_up_to is None else self.every_up_to
        k = 0
        while k < self.max_steps:
            k = k + 1 if k < dense_until else k + self.stride
            if k <= self.max_steps:
                yield k

    def describe(self) -> str:
        if self.is_every_step:
            return f"every step up to {self.max_steps}"
        return (
            f"every step up to {self.every_up_to}, then every {self.stride}th "
            f"up to {self.max_steps}"
        )


#: Every step, up to ``DEFAULT_MAX_STEPS``.
EVERY_STEP = SampleSteps()


def sweep_depth_from_environment(environ: Mapping[str, str] | None = None) -> SweepDepth:
    """``$RPBROKER_SWEEP`` as a ``SweepDepth``: unset or ``sampled``, or ``full``.

    Raises ``SweepUsageError`` naming the variable and the accepted values for
    anything else.
    """
    value = (os.environ if environ is None else environ).get(SWEEP_ENV, "").strip().lower()
    if not value:
        return SweepDepth.SAMPLED
    try:
        return SweepDepth(value)
    except ValueError:
        accepted = ", ".join(repr(depth.value) for depth in SweepDepth)
        raise SweepUsageError(
            f"{SWEEP_ENV}={value!r} is not understood: set it to one of {accepted} or unset it"
        ) from None


def steps_from_environment(
    sampled: SampleSteps, environ: Mapping[str, str] | None = None
) -> SampleSteps:
    """``sampled``, or every step (same ``max_steps``) when ``$RPBROKER_SWEEP=full``."""
    if sweep_depth_from_environment(environ) is SweepDepth.FULL:
        return SampleSteps(max_steps=sampled.max_steps)
    return sampled
