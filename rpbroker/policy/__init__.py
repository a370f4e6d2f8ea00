"""Sans-IO policy core of rpbroker.

Pure, synchronous state machines that take ``now`` (seconds on a monotonic
clock, for example ``trio.current_time()``) as an argument and return typed
decisions. Nothing here touches sockets, processes or clocks; the trio shell
does the I/O, the waiting and the wire mapping.

- :mod:`~rpbroker.policy.tokens`: one-time handoff tokens.
- :mod:`~rpbroker.policy.ack`: pending-ACK registry with deadlines.
- :mod:`~rpbroker.policy.fallback`: attempt-or-fallback decision, failed-attempt limit.
- :mod:`~rpbroker.policy.pending`: bounded FIFO of handoffs waiting for a slot.
- :mod:`~rpbroker.policy.recovery`: crash recovery (one retry, then unavailable).
- :mod:`~rpbroker.policy.spawn_budget`: spawn attempts per key per window.
- :mod:`~rpbroker.policy.spawn_wait`: readiness polling decisions.
- :mod:`~rpbroker.policy.idle`: idle tracking for quiesce.
- :mod:`~rpbroker.policy.fd_pressure`: descriptor-exhaustion demotion.
- :mod:`~rpbroker.policy.broadcast`: lifecycle broadcast outcomes and model.
- :mod:`~rpbroker.policy.hello`: Hello shape, version policy, rate limit, keepalive.
"""

from __future__ import annotations

from rpbroker.policy.ack import (
    DEFAULT_ACK_DEADLINE_S,
    AckCompleted,
    AckOutcome,
    AckRegistry,
    AckRejected,
    AckRejection,
    BackendRef,
    ExpiredHandoff,
)
from rpbroker.policy.broadcast import (
    DEFAULT_BROADCAST_ACK_TIMEOUT_S,
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastOperation,
    BroadcastOutcome,
    BroadcastPolicy,
    BroadcastResult,
    InMemoryBroadcastModel,
    ModelResponse,
    Quiesce,
    QuiesceReason,
    ReleaseHandles,
    ScriptedResponse,
    backend_json,
)
from rpbroker.policy.fallback import (
    ATTEMPT,
    DEFAULT_FAILED_ATTEMPT_WINDOW_S,
    DEFAULT_MAX_FAILED_ATTEMPTS,
    Attempt,
    Fallback,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffDecision,
    HandoffInputs,
)
from rpbroker.policy.fd_pressure import (
    DEFAULT_FD_PRESSURE_RETRY_AFTER_S,
    DEFAULT_RECOVERY_ACCEPTS,
    FD_PRESSURE_ACCEPT_BACKOFF_S,
    FD_PRESSURE_REASON,
    AcceptErrorAction,
    AcceptErrorDecision,
    AcceptErrorKind,
    FdPressureGuard,
    classify_accept_error,
)
from rpbroker.policy.hello import (
    DEFAULT_HELLO_RATE_LIMIT,
    DEFAULT_HELLO_RATE_WINDOW_S,
    DEFAULT_KEEPALIVE_SECS,
    MAX_CLIENT_LIB_FIELD_BYTES,
    MAX_CLIENT_VERSION_BYTES,
    MAX_SERVICE_NAME_BYTES,
    MAX_VERSION_BYTES,
    VERSION_BLOCKED_RETRY_AFTER_MS,
    HelloLike,
    HelloRateLimiter,
    Refusal,
    VersionPolicy,
    check_hello_shape,
    is_valid_semver,
    is_valid_service_name,
    negotiated_keepalive,
    semver_core,
)
from rpbroker.policy.idle import (
    DEFAULT_IDLE_TIMEOUT_S,
    BackendLifecycle,
    IdleDue,
    IdleTracker,
)
from rpbroker.policy.pending import (
    DEFAULT_MAX_PENDING_HANDOFFS,
    DEFAULT_PENDING_HANDOFF_TTL_S,
    PendingHandoffQueue,
    PendingOverflow,
)
from rpbroker.policy.recovery import (
    DEFAULT_RECOVERY_WINDOW_S,
    DEFAULT_RETRY_BACKOFF_S,
    CrashRecovery,
    MarkUnavailable,
    RecoveryDecision,
    RetryAfterBackoff,
)
from rpbroker.policy.spawn_budget import (
    DEFAULT_SPAWN_ATTEMPTS,
    DEFAULT_SPAWN_WINDOW_S,
    SPAWN_IN_PROGRESS,
    BudgetExhausted,
    BudgetSnapshot,
    SpawnBudget,
    SpawnDecision,
    SpawnInProgress,
    SpawnOutcome,
    SpawnPermit,
)
from rpbroker.policy.spawn_wait import (
    DEFAULT_SPAWN_WAIT_BACKOFF_S,
    DEFAULT_SPAWN_WAIT_CEILING_S,
    DaemonExitedBeforeReady,
    EndpointReady,
    SleepFor,
    SpawnWaitDecision,
    SpawnWaitPolicy,
    SpawnWaitTimeout,
)
from rpbroker.policy.tokens import (
    DEFAULT_COLLISION_ATTEMPTS,
    DEFAULT_MAX_PENDING_TOKENS,
    DEFAULT_TOKEN_TTL_S,
    HANDOFF_TOKEN_BYTES,
    HandoffToken,
    TokenCollisionExhausted,
    TokenRejection,
    TokenStore,
    TokenStoreError,
    TokenStoreFull,
    TokenVerdict,
    parse_token,
)

__all__ = [
    # tokens
    "DEFAULT_COLLISION_ATTEMPTS",
    "DEFAULT_MAX_PENDING_TOKENS",
    "DEFAULT_TOKEN_TTL_S",
    "HANDOFF_TOKEN_BYTES",
    "HandoffToken",
    "TokenCollisionExhausted",
    "TokenRejection",
    "TokenStore",
    "TokenStoreError",
    "TokenStoreFull",
    "TokenVerdict",
    "parse_token",
    # ack
    "DEFAULT_ACK_DEADLINE_S",
    "AckCompleted",
    "AckOutcome",
    "AckRegistry",
    "AckRejected",
    "AckRejection",
    "BackendRef",
    "ExpiredHandoff",
    # fallback
    "ATTEMPT",
    "DEFAULT_FAILED_ATTEMPT_WINDOW_S",
    "DEFAULT_MAX_FAILED_ATTEMPTS",
    "Attempt",
    "Fallback",
    "FallbackPolicy",
    "FallbackReason",
    "FallbackState",
    "HandoffDecision",
    "HandoffInputs",
    # pending queue
    "DEFAULT_MAX_PENDING_HANDOFFS",
    "DEFAULT_PENDING_HANDOFF_TTL_S",
    "PendingHandoffQueue",
    "PendingOverflow",
    # recovery
    "DEFAULT_RECOVERY_WINDOW_S",
    "DEFAULT_RETRY_BACKOFF_S",
    "CrashRecovery",
    "MarkUnavailable",
    "RecoveryDecision",
    "RetryAfterBackoff",
    # spawn budget
    "DEFAULT_SPAWN_ATTEMPTS",
    "DEFAULT_SPAWN_WINDOW_S",
    "SPAWN_IN_PROGRESS",
    "BudgetExhausted",
    "BudgetSnapshot",
    "SpawnBudget",
    "SpawnDecision",
    "SpawnInProgress",
    "SpawnOutcome",
    "SpawnPermit",
    # spawn wait
    "DEFAULT_SPAWN_WAIT_BACKOFF_S",
    "DEFAULT_SPAWN_WAIT_CEILING_S",
    "DaemonExitedBeforeReady",
    "EndpointReady",
    "SleepFor",
    "SpawnWaitDecision",
    "SpawnWaitPolicy",
    "SpawnWaitTimeout",
    # idle
    "DEFAULT_IDLE_TIMEOUT_S",
    "BackendLifecycle",
    "IdleDue",
    "IdleTracker",
    # fd pressure
    "DEFAULT_FD_PRESSURE_RETRY_AFTER_S",
    "DEFAULT_RECOVERY_ACCEPTS",
    "FD_PRESSURE_ACCEPT_BACKOFF_S",
    "FD_PRESSURE_REASON",
    "AcceptErrorAction",
    "AcceptErrorDecision",
    "AcceptErrorKind",
    "FdPressureGuard",
    "classify_accept_error",
    # broadcast
    "DEFAULT_BROADCAST_ACK_TIMEOUT_S",
    "BackendAcked",
    "BackendFailed",
    "BackendSkippedDead",
    "BackendTimedOut",
    "BroadcastCollector",
    "BroadcastFailure",
    "BroadcastOperation",
    "BroadcastOutcome",
    "BroadcastPolicy",
    "BroadcastResult",
    "InMemoryBroadcastModel",
    "ModelResponse",
    "Quiesce",
    "QuiesceReason",
    "ReleaseHandles",
    "ScriptedResponse",
    "backend_json",
    # hello
    "DEFAULT_HELLO_RATE_LIMIT",
    "DEFAULT_HELLO_RATE_WINDOW_S",
    "DEFAULT_KEEPALIVE_SECS",
    "MAX_CLIENT_LIB_FIELD_BYTES",
    "MAX_CLIENT_VERSION_BYTES",
    "MAX_SERVICE_NAME_BYTES",
    "MAX_VERSION_BYTES",
    "VERSION_BLOCKED_RETRY_AFTER_MS",
    "HelloLike",
    "HelloRateLimiter",
    "Refusal",
    "VersionPolicy",
    "check_hello_shape",
    "is_valid_semver",
    "is_valid_service_name",
    "negotiated_keepalive",
    "semver_core",
]
