"""Helpers for the sweep's own tests: find a marked source line of a toy target."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def line_of(function: Callable[..., object], marker: str) -> int:
    """Line number of the single line of ``function`` that contains ``marker``."""
    lines, first = inspect.getsourcelines(function)
    found = [first + i for i, line in enumerate(lines) if marker in line]
    assert len(found) == 1, f"{marker!r} must mark exactly one line of {function.__name__}"
    return found[0]
