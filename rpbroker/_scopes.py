"""Small cancel-scope helpers shared by the broker's races.

What this module does: ``cancel_when_set``, the task body that ends a race when an
event fires (backend ready or exited, broker shutting down).

What it does not do: own any scope or event; callers pass both in.
"""

from __future__ import annotations

import trio


async def cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set.

    Cancellation: being cancelled just stops waiting; ``scope`` is left alone.
    """
    await event.wait()
    scope.cancel()
