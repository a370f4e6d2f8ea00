"""Exception groups at the library surface: one exception comes out as itself.

What this module does: ``single_exception_as_itself``, a context manager for the
library's own context managers and serve functions that run internal nurseries.
trio wraps whatever a nursery raises in a ``BaseExceptionGroup``; when the group
holds exactly one exception (at any depth) it is re-raised as that exception, so
callers can write ``except ConfigError`` or see ``KeyboardInterrupt`` (trio's
advice for context managers that hide their nurseries).

What it does not do: merge or drop exceptions: a group of two or more is raised
unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@contextmanager
def single_exception_as_itself() -> Iterator[None]:
    """Re-raise a ``BaseExceptionGroup`` that holds one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None
