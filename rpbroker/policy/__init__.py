"""Sans-IO policy core of rpbroker.

Pure, synchronous state machines that take ``now`` (seconds on a monotonic
clock, for example ``trio.current_time()``) as an argument and return typed
decisions. Nothing here touches sockets, processes or clocks; the trio shell
does the I/O, the waiting and the wire mapping, and executes exactly what these
modules decide. Import from the modules themselves:

- :mod:`~rpbroker.policy.lifecycle`: one backend incarnation's life (the
  transition table the supervisor drives).
- :mod:`~rpbroker.policy.tokens`: one-time handoff tokens.
- :mod:`~rpbroker.policy.ack`: pending-ACK registry with deadlines.
- :mod:`~rpbroker.policy.fallback`: attempt-or-fallback decision, failed-attempt limit.
- :mod:`~rpbroker.policy.recovery`: crash recovery (one retry, then unavailable).
- :mod:`~rpbroker.policy.spawn_budget`: spawn attempts per key and per service per window.
- :mod:`~rpbroker.policy.spawn_wait`: readiness polling decisions.
- :mod:`~rpbroker.policy.idle`: idle tracking for quiesce.
- :mod:`~rpbroker.policy.fd_pressure`: descriptor-exhaustion demotion.
- :mod:`~rpbroker.policy.broadcast`: lifecycle broadcast operations, outcomes, results.
- :mod:`~rpbroker.policy.hello`: Hello shape, version policy, rate limit, keepalive.
"""
