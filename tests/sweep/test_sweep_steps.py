"""Cut points: dense then strided sampling, bad values, and ``$RPBROKER_SWEEP``."""

from __future__ import annotations

import itertools

import pytest

from rpbroker.testing import (
    SWEEP_ENV,
    SampleSteps,
    SweepDepth,
    SweepUsageError,
    steps_from_environment,
    sweep_depth_from_environment,
)


def test_every_step_by_default_up_to_max_steps() -> None:
    assert list(SampleSteps(max_steps=5).cut_points()) == [1, 2, 3, 4, 5]
    assert SampleSteps().is_every_step


def test_dense_then_strided() -> None:
    steps = SampleSteps(every_up_to=4, stride=10, max_steps=40)
    assert list(steps.cut_points()) == [1, 2, 3, 4, 14, 24, 34]
    assert not steps.is_every_step
    assert "then every 10th" in steps.describe()


def test_cut_points_stop_at_max_steps_even_when_dense() -> None:
    steps = SampleSteps(every_up_to=100, stride=7, max_steps=3)
    assert list(itertools.islice(steps.cut_points(), 10)) == [1, 2, 3]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"every_up_to": 0}, "every_up_to"),
        ({"stride": 0}, "stride"),
        ({"max_steps": -1}, "max_steps"),
    ],
)
def test_bad_sample_names_the_field(fields: dict[str, int], named: str) -> None:
    with pytest.raises(SweepUsageError, match=f"SampleSteps.{named} must be at least 1"):
        SampleSteps(**fields)


def test_environment_selects_full_or_sampled() -> None:
    sampled = SampleSteps(every_up_to=3, stride=5, max_steps=99)
    assert steps_from_environment(sampled, {}) is sampled
    assert steps_from_environment(sampled, {SWEEP_ENV: "sampled"}) is sampled
    full = steps_from_environment(sampled, {SWEEP_ENV: " FULL "})
    assert full == SampleSteps(max_steps=99)
    assert sweep_depth_from_environment({SWEEP_ENV: "full"}) is SweepDepth.FULL


def test_environment_rejects_unknown_values_with_the_fix() -> None:
    with pytest.raises(SweepUsageError, match=r"RPBROKER_SWEEP='every'.*'sampled', 'full'"):
        sweep_depth_from_environment({SWEEP_ENV: "every"})
