"""Backend supervision: the registry, each incarnation's life, its control link, broadcasts.

- :mod:`~rpbroker.supervisor.registry`: which incarnation serves each key,
  single-flight spawns under the budget, crash recovery, idle quiesce, shutdown.
- :mod:`~rpbroker.supervisor.incarnation`: one backend process driven through the
  pure lifecycle table (``rpbroker.policy.lifecycle``).
- :mod:`~rpbroker.supervisor.link`: the control channel of one backend, its single
  reader and its request/reply correlations.
- :mod:`~rpbroker.supervisor.fanout`: lifecycle broadcasts to many backends at once.

What this package does not do: speak to clients (``rpbroker.broker``), or pass
connections (``rpbroker.handoff`` does, through a link).
"""

from rpbroker.supervisor.incarnation import BackendKey, Incarnation
from rpbroker.supervisor.registry import BackendRegistry

__all__ = ["BackendKey", "BackendRegistry", "Incarnation"]
