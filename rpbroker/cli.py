"""The ``rpbroker`` command line: start a broker, check it, watch it, stop it.

What this module does: ``serve`` builds a ``BrokerConfig`` from ``--config FILE``
and flags (flags > ``$RPBROKER_SOCKET`` > the file > defaults; a bad value is
reported by the flag's name or by the file and key), writes its log lines as
``key=value`` text or JSON on stderr, runs the broker in the foreground and says
where it listens. The first SIGINT/SIGTERM starts a graceful shutdown and the
drain's progress is reported ("waiting for 2 backends, 1 connection, 7 s left");
a second one stops at once (backends killed, socket removed, exit status 128 +
the signal's number). The admin commands send one verb to a running broker
(``--socket``, else ``$RPBROKER_SOCKET``, else the per-user shared endpoint the
client library uses too) and print the reply for people (a backend table,
readable sections) or as JSON with ``--json``; their exit status says what the
reply said (see ``ExitStatus``).

What it does not do: daemonise or write pid files (run it under systemd,
supervisord or circus), or watch its config file.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs
import trio

import transports
from rpbroker import __version__, admin
from rpbroker.admin_client import (
    StreamSummary,
    admin_request,
    broadcast_request,
    read_stream,
    service_command,
)
from rpbroker.broker import Broker, serve_broker
from rpbroker.client import default_broker_endpoint
from rpbroker.config import BrokerConfig, ServiceManager
from rpbroker.config_file import (
    ConfigFile,
    MissingConfigValue,
    Override,
    build_config,
    read_config_file,
)
from rpbroker.errors import BrokerError, BrokerUnavailableError, ConfigError
from rpbroker.events import EventKind
from rpbroker.logfmt import (
    ENV_LOG_FORMAT,
    ENV_LOG_LEVEL,
    LEVEL_NAMES,
    KeyValues,
    LogFormat,
    configure_logging,
    env_log_format,
    env_log_level,
    parse_format,
    parse_level,
)
from rpbroker.policy.broadcast import BroadcastOperation, Quiesce, QuiesceReason, ReleaseHandles
from rpbroker.servicecheck import check_services_directory
from rpbroker.services import ServiceDirectoryError, ServiceLoadError
from rpbroker.wire import StreamRecord
from rpbroker.wire.codes import (
    AdminVerb,
    ServiceCommand,
    ServiceCommandOutcome,
    StreamEndReason,
    StreamSource,
)

#: The variable naming the broker socket when ``--socket`` is not given.
ENV_SOCKET = "RPBROKER_SOCKET"

#: How often a draining broker reports what it still waits for, seconds: often
#: enough to watch a 10 s drain, rare enough not to flood a log.
DRAIN_REPORT_INTERVAL_S = 1.0

#: Logger of the lines ``serve`` writes about itself (listening, signals, drain
#: progress, stopped). They are written whatever ``--log-level`` says.
serve_logger = logging.getLogger("rpbroker.serve")


class ExitStatus(enum.IntEnum):
    """What the command's exit status means."""

    OK = 0
    #: The broker answered "no": not ready, service unavailable, broadcast not acked
    #: (``check``: the services directory has problems).
    NO = 1
    #: A bad flag, config file or verb: fix the invocation.
    USAGE = 2
    #: No broker, socket in use, insecure directory...: fix the environment.
    OPERATOR = 3
    #: ``backend-health``: the broker knows no such service.
    UNKNOWN_SERVICE = 4


#: Errors that are the operator's to fix, reported as one line (``ExitStatus.OPERATOR``).
OPERATOR_ERRORS = (BrokerError, transports.TransportError, ServiceLoadError)

_VERBS: dict[str, AdminVerb] = {
    "status": AdminVerb.STATUS,
    "dump": AdminVerb.DUMP,
    "list-instances": AdminVerb.LIST_INSTANCES,
    "healthz": AdminVerb.HEALTHZ,
    "readyz": AdminVerb.READYZ,
    "backend-health": AdminVerb.BACKEND_HEALTH,
    "config": AdminVerb.CONFIG,
    "diagnose": AdminVerb.DIAGNOSE,
    "metrics": AdminVerb.METRICS,
    "shutdown": AdminVerb.SHUTDOWN,
}

_VERB_HELP = {
    "status": "the broker and a table of its backends",
    "dump": "backends, spawn budgets, effective config and recent lifecycle events",
    "list-instances": "broker instances on this endpoint",
    "healthz": "liveness: 'ok' while the broker answers",
    "readyz": "readiness: exit 1 while the broker does not accept Hellos",
    "backend-health": "one service's backends; exit 1 if none runs, 4 if the service is unknown",
    "config": "effective configuration, with where each value came from",
    "diagnose": "what a diagnostic bundle holds, and whether one was written",
    "metrics": "OpenMetrics text",
    "shutdown": "ask the broker to shut down gracefully",
}


def _render_config(document: Mapping[str, Any]) -> str:
    return "\n".join(admin.config_lines(document.get("values", {}))) + "\n"


#: Verbs whose JSON reply has a rendering for people (the rest print indented JSON).
_TEXT_RENDERERS: dict[AdminVerb, Callable[[Mapping[str, Any]], str]] = {
    AdminVerb.STATUS: admin.status_text,
    AdminVerb.DUMP: admin.dump_text,
    AdminVerb.CONFIG: _render_config,
    AdminVerb.BACKEND_HEALTH: admin.backend_health_text,
    AdminVerb.DIAGNOSE: admin.diagnose_text,
}

_VERDICT_EXIT = {
    admin.ServiceVerdict.AVAILABLE.value: ExitStatus.OK,
    admin.ServiceVerdict.UNAVAILABLE.value: ExitStatus.NO,
    admin.ServiceVerdict.UNKNOWN.value: ExitStatus.UNKNOWN_SERVICE,
}


# -- serve's flags ---------------------------------------------------------------------


class _FlagKind(enum.Enum):
    SECONDS = "SECONDS"
    COUNT = "N"
    PATH = "PATH"
    NAME = "NAME"
    SWITCH = "SWITCH"


@attrs.frozen
class ConfigFlag:
    """A ``serve`` flag that sets one ``BrokerConfig`` field."""

    flag: str
    field: str
    kind: _FlagKind
    help: str


#: The common ``BrokerConfig`` fields as flags; every field can be set in ``--config``.
SERVE_FLAGS: tuple[ConfigFlag, ...] = (
    ConfigFlag(
        "--services", "services_dir", _FlagKind.PATH, "service definitions directory (mode 0700)"
    ),
    ConfigFlag(
        "--runtime-dir", "runtime_dir", _FlagKind.PATH, "where backend endpoints are created"
    ),
    ConfigFlag("--instance-name", "instance_name", _FlagKind.NAME, "broker instance name"),
    ConfigFlag(
        "--hello-timeout",
        "hello_timeout_s",
        _FlagKind.SECONDS,
        "deadline for a new connection's first frame",
    ),
    ConfigFlag(
        "--hello-wait-timeout",
        "hello_wait_timeout_s",
        _FlagKind.SECONDS,
        "how long a Hello may wait for its backend to start",
    ),
    ConfigFlag(
        "--spawn-ready-timeout",
        "spawn_ready_timeout_s",
        _FlagKind.SECONDS,
        "how long a new backend may take to become ready",
    ),
    ConfigFlag(
        "--drain-timeout",
        "drain_timeout_s",
        _FlagKind.SECONDS,
        "how long a graceful shutdown lets backends drain before killing them",
    ),
    ConfigFlag(
        "--ack-deadline",
        "ack_deadline_s",
        _FlagKind.SECONDS,
        "how long a backend may take to acknowledge a handed-off connection",
    ),
    ConfigFlag(
        "--broadcast-ack-timeout",
        "broadcast_ack_timeout_s",
        _FlagKind.SECONDS,
        "how long each backend may take to acknowledge a broadcast",
    ),
    ConfigFlag(
        "--hello-rate-limit", "hello_rate_limit", _FlagKind.COUNT, "Hellos per second per peer pid"
    ),
    ConfigFlag(
        "--handoff",
        "handoff_enabled",
        _FlagKind.SWITCH,
        "hand client connections to backends (--no-handoff: reconnect route only)",
    ),
    ConfigFlag(
        "--idle-check",
        "idle_check_enabled",
        _FlagKind.SWITCH,
        "quiesce backends idle past their idle timeout (--no-idle-check: never)",
    ),
)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (got {text!r})") from None


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (got {text!r})") from None


def _level(text: str) -> int:
    try:
        return parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _format(text: str) -> LogFormat:
    try:
        return parse_format(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_FLAG_TYPES: dict[_FlagKind, Callable[[str], Any]] = {
    _FlagKind.SECONDS: _seconds,
    _FlagKind.COUNT: _count,
    _FlagKind.PATH: str,
    _FlagKind.NAME: str,
}


def _default_text(field: str) -> str:
    default = attrs.fields_dict(BrokerConfig)[field].default
    if not isinstance(default, str | int | float):  # required, None or a factory
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    if isinstance(default, float):
        return f" (default: {default:g} s)"
    return f" (default: {default})"


def _socket_help() -> str:
    return f"broker socket (default: ${ENV_SOCKET}, else the per-user shared endpoint)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpbroker",
        description="Run an rpbroker service broker, query it, and broadcast to its backends.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"rpbroker {__version__} (running-process broker protocol v1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run a broker in the foreground",
        description="Run a broker in the foreground until SIGINT/SIGTERM (twice: at once).",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="broker config file (TOML); flags override it"
    )
    serve.add_argument("--socket", metavar="PATH", help=_socket_help())
    for flag in SERVE_FLAGS:
        if flag.kind is _FlagKind.SWITCH:
            serve.add_argument(
                flag.flag,
                dest=flag.field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=flag.help + _default_text(flag.field),
            )
        else:
            serve.add_argument(
                flag.flag,
                dest=flag.field,
                type=_FLAG_TYPES[flag.kind],
                default=None,
                metavar=flag.kind.value,
                help=flag.help + _default_text(flag.field),
            )
    serve.add_argument(
        "--log-level",
        type=_level,
        default=None,
        metavar="LEVEL",
        help=f"{', '.join(LEVEL_NAMES)}, any case (default: ${ENV_LOG_LEVEL}, else info)",
    )
    serve.add_argument(
        "--log-format",
        type=_format,
        default=None,
        metavar="FORMAT",
        help=f"text (key=value) or json (default: ${ENV_LOG_FORMAT}, else text)",
    )

    for name, verb in _VERBS.items():
        command = sub.add_parser(name, help=_VERB_HELP[name], description=_VERB_HELP[name])
        command.add_argument("--socket", metavar="PATH", help=_socket_help())
        command.add_argument("--json", action="store_true", help="print the JSON reply, if any")
        command.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS")
        if verb is AdminVerb.BACKEND_HEALTH:
            command.add_argument("service", help="service name")
        if verb is AdminVerb.SHUTDOWN:
            command.add_argument(
                "--drain-deadline-ms",
                type=_count,
                default=0,
                metavar="MS",
                help="drain bound for this shutdown (default: the broker's drain timeout)",
            )

    broadcast = sub.add_parser("broadcast", help="send a lifecycle broadcast to every backend")
    ops = broadcast.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    quiesce = ops.add_parser("quiesce", help="stop, drain and exit every backend")
    quiesce.add_argument(
        "--reason",
        default="maintenance",
        choices=["maintenance", "idle-timeout", "broker-shutdown"],
    )
    release = ops.add_parser("release-handles", help="ask backends to release handles under PREFIX")
    release.add_argument("prefix")
    for op in (quiesce, release):
        op.add_argument("--socket", metavar="PATH", help=_socket_help())
        op.add_argument("--json", action="store_true")
        op.add_argument("--ack-timeout", type=_seconds, default=None, metavar="SECONDS")
        op.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS")
    for name, text in _SERVICE_COMMAND_HELP.items():
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("service", help="service name")
        command.add_argument("--socket", metavar="PATH", help=_socket_help())
        command.add_argument("--json", action="store_true", help="print the JSON report")
        command.add_argument(
            "--grace" if name != "quiesce" else "--ack-timeout",
            dest="command_timeout",
            type=_seconds,
            default=None,
            metavar="SECONDS",
            help="SIGTERM to SIGKILL (default: the broker's drain timeout)"
            if name != "quiesce"
            else "how long each backend may take to acknowledge (default: the broker's)",
        )
        command.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS")
    for name, text in _STREAM_HELP.items():
        command = sub.add_parser(name, help=text, description=text)
        if name == "logs":
            command.add_argument("service", help="service name")
        command.add_argument("--socket", metavar="PATH", help=_socket_help())
        command.add_argument("--json", action="store_true", help="one JSON object per line")
        command.add_argument(
            "-f", "--follow", action="store_true", help="then live ones, until Ctrl-C"
        )
        command.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS")
    check = sub.add_parser(
        "check",
        help="validate a services directory offline (exit 1 if any problem)",
        description="Print every problem of a services directory (file, field, fix).",
    )
    check.add_argument("--services", required=True, help="service definitions directory")
    return parser


def _check(services: str) -> int:
    """``rpbroker check``: print every problem (file, field, fix); 1 if any, else 0."""
    try:
        report = check_services_directory(services)
    except ServiceDirectoryError as exc:
        print(exc)
        return ExitStatus.NO
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {report.directory}")
        return ExitStatus.NO
    print(f"{report.directory}: {len(report.services)} service definition(s), no problems")
    return ExitStatus.OK


# -- serve -----------------------------------------------------------------------------


@attrs.frozen
class ServeSettings:
    """Everything ``serve`` needs besides the parser: the config and how to log."""

    config: BrokerConfig
    log_level: int
    log_format: LogFormat


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServeSettings:
    """Combine ``serve``'s flags, ``environ`` and the ``--config`` file.

    Raises:
        ConfigError: a bad value; the message names the flag, the variable, or the
            file and its key.
        MissingConfigValue: no services directory anywhere.
    """
    file: ConfigFile | None = read_config_file(args.config) if args.config else None
    overrides = {
        flag.field: Override(flag.flag, getattr(args, flag.field))
        for flag in SERVE_FLAGS
        if getattr(args, flag.field) is not None
    }
    if args.socket:
        overrides["socket_path"] = Override("--socket", args.socket)
    elif environ.get(ENV_SOCKET):
        overrides["socket_path"] = Override(f"${ENV_SOCKET}", environ[ENV_SOCKET])
    # Otherwise the file's, else none: the broker then serves the socket systemd
    # passed, or binds the per-user shared endpoint that clients look for.
    level = args.log_level if args.log_level is not None else env_log_level(environ, logging.INFO)
    fmt = args.log_format if args.log_format is not None else env_log_format(environ)
    config = build_config(file, overrides)
    # Socket activation and sd_notify when systemd started us; inert otherwise.
    config = attrs.evolve(config, service_manager=ServiceManager.SYSTEMD)
    # Backends log like the broker unless the config's backend_env says otherwise.
    backend_env = {
        ENV_LOG_LEVEL: logging.getLevelName(level).lower(),
        ENV_LOG_FORMAT: fmt.value,
        **config.backend_env,
    }
    return ServeSettings(
        config=attrs.evolve(config, backend_env=backend_env), log_level=level, log_format=fmt
    )


@attrs.define
class StopRecord:
    """How a ``serve`` run was asked to stop."""

    #: The signal that asked for a graceful shutdown, if one did.
    graceful_by: signal.Signals | None = None
    #: The signal that ended the broker at once, if one did.
    forced_by: signal.Signals | None = None

    @property
    def exit_status(self) -> int:
        """0 after a graceful stop; 128 + the signal's number after a forced one."""
        return 128 + int(self.forced_by) if self.forced_by is not None else 0


def _say(level: int, message: str, **fields: Any) -> None:
    serve_logger.log(level, KeyValues.of(msg=message, **fields))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def run_serve(config: BrokerConfig, stop: StopRecord) -> None:
    """Serve until stopped by a signal, an admin SHUTDOWN or the event loop ending.

    Signals are caught from before the broker binds, so one that arrives while it
    starts stops it as soon as it is up. Cancellation: cancelling shuts the
    broker down as ``Broker.serve`` describes.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            broker: Broker = await nursery.start(serve_broker, config)
            nursery.start_soon(_report_drain, broker)
            nursery.start_soon(_stop_on_signals, broker, signals, stop)
            _say(
                logging.INFO,
                f"serving on {broker.socket_path}",
                socket=broker.socket_path,
                pid=os.getpid(),
                instance=config.instance_name,
                services_dir=str(config.services_dir),
            )
            await broker.wait_stopped()
            nursery.cancel_scope.cancel()
    if stop.forced_by is not None:
        _say(logging.WARNING, "stopped at once", forced=True, signal=stop.forced_by.name)
    else:
        _say(logging.INFO, "stopped", forced=False)


async def _stop_on_signals(broker: Broker, signals: AsyncIterator[int], stop: StopRecord) -> None:
    """First signal: graceful shutdown. Any signal during a shutdown: stop at once.

    Cancellation: just stops listening.
    """
    async for signum in signals:
        name = signal.Signals(signum)
        if broker.accepting:
            stop.graceful_by = name
            _say(
                logging.INFO,
                f"{name.name}: shutting down gracefully; send {name.name} again to stop at once",
                signal=name.name,
            )
            broker.request_shutdown()
            continue
        stop.forced_by = name
        left = len(broker.status()["backends"])
        _say(
            logging.WARNING,
            f"{name.name} during shutdown: stopping at once, killing {_plural(left, 'backend')}",
            signal=name.name,
            backends=left,
        )
        broker.force_stop()
        return


async def _report_drain(broker: Broker) -> None:
    """When a shutdown starts (by any means), report what the drain waits for.

    Cancellation: just stops reporting.
    """
    async with trio.open_nursery() as nursery:
        async for event in broker.iter_events():
            if event.kind is EventKind.BROKER_STOPPING:
                drain_s = float(event.details.get("drain_timeout_ms", 0)) / 1000
                nursery.start_soon(_drain_progress, broker, trio.current_time() + drain_s)


async def _drain_progress(broker: Broker, deadline: float) -> None:
    """Every ``DRAIN_REPORT_INTERVAL_S``: backends left, their connections, time left.

    Cancellation: just stops reporting.
    """
    while True:
        rows = broker.status()["backends"]
        if not rows:
            return  # the broker is about to say "stopped"
        connections = sum(int(row.get("open_connections") or 0) for row in rows)
        left_s = max(0, math.ceil(deadline - trio.current_time()))
        waiting = ", ".join(f"{row['service_name']}/{row['pid']}" for row in rows)
        if left_s == 0:
            _say(
                logging.WARNING,
                f"drain time is up: killing {_plural(len(rows), 'backend')}",
                backends=len(rows),
                connections=connections,
                waiting_for=waiting,
            )
            return
        _say(
            logging.INFO,
            f"draining: waiting for {_plural(len(rows), 'backend')}, "
            f"{_plural(connections, 'connection')}, {left_s} s left",
            backends=len(rows),
            connections=connections,
            remaining_s=left_s,
            waiting_for=waiting,
        )
        await trio.sleep(min(DRAIN_REPORT_INTERVAL_S, max(0.0, deadline - trio.current_time())))


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        settings = serve_settings(args)
    except MissingConfigValue as exc:
        if exc.field != "services_dir":  # pragma: no cover - the only required field
            raise
        parser.exit(
            ExitStatus.USAGE,
            "rpbroker serve: error: no services directory: pass --services DIR or set "
            "services_dir in the --config file\n",
        )
    except ConfigError as exc:
        parser.exit(ExitStatus.USAGE, f"rpbroker serve: error: {exc}\n")
    configure_logging(settings.log_level, settings.log_format)
    serve_logger.setLevel(logging.INFO)
    stop = StopRecord()
    trio.run(run_serve, settings.config, stop)
    return stop.exit_status


# -- admin commands --------------------------------------------------------------------


def _socket(args: argparse.Namespace) -> str:
    return str(args.socket) if args.socket else default_broker_endpoint()


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _admin(args: argparse.Namespace) -> int:
    verb = _VERBS[args.command]
    as_json = bool(getattr(args, "json", False))
    reply = trio.run(
        partial(
            admin_request,
            _socket(args),
            verb,
            # STATUS is rendered here from its JSON form, as are the other JSON verbs.
            json_output=as_json or verb is AdminVerb.STATUS,
            service_name=getattr(args, "service", ""),
            drain_deadline_ms=getattr(args, "drain_deadline_ms", 0),
            timeout_s=args.timeout,
        )
    )
    if reply.content_type != "application/json":
        _write(reply.body)
        return int(reply.exit_code)
    document = json.loads(reply.body)
    renderer = _TEXT_RENDERERS.get(verb)
    if as_json or renderer is None:
        _write(json.dumps(document, indent=2, sort_keys=True))
    else:
        _write(renderer(document))
    if verb is AdminVerb.BACKEND_HEALTH:
        return _VERDICT_EXIT.get(str(document.get("verdict")), ExitStatus.UNKNOWN_SERVICE)
    return int(reply.exit_code)


def _broadcast(args: argparse.Namespace) -> int:
    operation: BroadcastOperation
    if args.operation == "quiesce":
        operation = Quiesce(QuiesceReason(args.reason.replace("-", "_")))
    else:
        operation = ReleaseHandles(args.prefix)
    document = trio.run(
        partial(
            broadcast_request,
            _socket(args),
            operation,
            ack_timeout_s=args.ack_timeout,
            timeout_s=args.timeout,
        )
    )
    if args.json:
        _write(json.dumps(document, indent=2, sort_keys=True))
    else:
        for key, value in document.items():
            if isinstance(value, list | dict):
                value = json.dumps(value, sort_keys=True)
            print(f"{key}: {value}")
    return ExitStatus.OK if document.get("all_live_backends_acked") else ExitStatus.NO


# -- one service, and streams ------------------------------------------------------------

_SERVICE_COMMAND_HELP = {
    "stop": "stop one service's backends (SIGTERM, SIGKILL after the grace) and keep it stopped",
    "restart": "stop one service's backends; the next Hello starts a fresh one",
    "quiesce": "ask one service's backends to drain and exit; the next Hello starts a fresh one",
}
_SERVICE_COMMANDS = {
    "stop": ServiceCommand.STOP,
    "restart": ServiceCommand.RESTART,
    "quiesce": ServiceCommand.QUIESCE,
}
_STREAM_HELP = {
    "events": "recent lifecycle events, one per line (--follow: then live ones)",
    "logs": "the last lines one service's backends wrote (--follow: then live ones)",
}
_OUTCOME_EXIT = {
    ServiceCommandOutcome.DONE: ExitStatus.OK,
    ServiceCommandOutcome.INCOMPLETE: ExitStatus.NO,
    ServiceCommandOutcome.UNKNOWN_SERVICE: ExitStatus.UNKNOWN_SERVICE,
    ServiceCommandOutcome.BAD_REQUEST: ExitStatus.USAGE,
}
_END_EXIT = {
    StreamEndReason.HISTORY_SENT: ExitStatus.OK,
    StreamEndReason.BROKER_STOPPING: ExitStatus.OK,
    StreamEndReason.UNKNOWN_SERVICE: ExitStatus.UNKNOWN_SERVICE,
    StreamEndReason.BAD_REQUEST: ExitStatus.USAGE,
}


def service_command_text(command: str, document: Mapping[str, Any]) -> str:
    """A service command's report for people: what was done, then one line per backend."""
    name = document.get("service_name")
    if command == "quiesce":
        sent = int(document.get("sent_count", 0))
        acked = len(document.get("acks", []))
        lines = [
            f"quiesce: {name}: {acked} of {_plural(sent, 'backend')} acknowledged; "
            "they drain and exit, the next Hello starts a fresh one"
        ]
        lines.extend(f"  timed out: {row.get('backend')}" for row in document.get("timeouts", []))
        lines.extend(
            f"  failed: {row.get('backend')}: {row.get('failure')} {row.get('detail', '')}".rstrip()
            for row in document.get("failures", [])
        )
        return "\n".join(lines) + "\n"
    rows = list(document.get("backends", []))
    then = (
        f"new Hellos are refused until `rpbroker restart {name}`"
        if document.get("held")
        else "the next Hello starts a fresh one"
    )
    lines = [f"{command}: {name}: {_plural(len(rows), 'backend')} stopped; {then}"]
    for row in rows:
        status = row.get("exit_status")
        lines.append(
            f"  {row.get('service_version')} pid {row.get('pid')} {row.get('state')}"
            + ("" if status is None else f", exit status {status}")
        )
    return "\n".join(lines) + "\n"


def _service_command(args: argparse.Namespace) -> int:
    result = trio.run(
        partial(
            service_command,
            _socket(args),
            _SERVICE_COMMANDS[args.command],
            args.service,
            command_timeout_s=args.command_timeout,
            timeout_s=args.timeout,
        )
    )
    if result.outcome in (ServiceCommandOutcome.UNKNOWN_SERVICE, ServiceCommandOutcome.BAD_REQUEST):
        print(f"rpbroker: {result.document.get('detail', result.outcome.name)}", file=sys.stderr)
    elif args.json:
        _write(json.dumps(result.document, indent=2, sort_keys=True))
    else:
        _write(service_command_text(args.command, result.document))
    return _OUTCOME_EXIT.get(result.outcome, ExitStatus.NO)


def output_line_text(line: Mapping[str, Any]) -> str:
    """One kept backend line: time, version, pid, stream, then the text."""
    cut = " [truncated]" if line.get("truncated") else ""
    return (
        f"{admin.iso_time(int(line.get('at_unix_ms', 0)))}  {line.get('service_version')} "
        f"pid={line.get('pid')} {line.get('stream')}  {line.get('text')}{cut}"
    )


def _print_record(as_json: bool, record: StreamRecord) -> None:
    if record.WhichOneof("record") == "event_json":
        event = json.loads(record.event_json)
        text = json.dumps(event, sort_keys=True) if as_json else admin.event_line(event)
    else:
        line = record.output_line
        document = {
            "service_name": line.service_name,
            "service_version": line.service_version,
            "pid": line.pid,
            "stream": line.stream,
            "text": line.text,
            "at_unix_ms": line.at_unix_ms,
            "truncated": line.truncated,
        }
        if record.dropped_before:
            print(
                f"rpbroker: {record.dropped_before} lines dropped (this reader fell behind)",
                file=sys.stderr,
                flush=True,
            )
        text = json.dumps(document, sort_keys=True) if as_json else output_line_text(document)
    print(text, flush=True)


def _stream(args: argparse.Namespace) -> int:
    source = StreamSource.EVENTS if args.command == "events" else StreamSource.BACKEND_OUTPUT
    summary: StreamSummary = trio.run(
        partial(
            read_stream,
            _socket(args),
            source,
            partial(_print_record, args.json),
            service_name=getattr(args, "service", ""),
            follow=args.follow,
            timeout_s=args.timeout,
        )
    )
    if summary.reason is None:
        print("rpbroker: the broker closed the stream", file=sys.stderr)
        return ExitStatus.NO
    if summary.detail:
        print(f"rpbroker: {summary.detail}", file=sys.stderr)
    if summary.dropped:
        print(f"rpbroker: {summary.dropped} records dropped in all", file=sys.stderr)
    return _END_EXIT.get(summary.reason, ExitStatus.NO)


# -- entry point -----------------------------------------------------------------------


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _report(exc: BaseException) -> None:
    hint = ""
    if isinstance(exc, BrokerUnavailableError):
        hint = f" (is `rpbroker serve` running? the socket is --socket, else ${ENV_SOCKET})"
    print(f"rpbroker: {exc}{hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(parser, args)
        if args.command == "broadcast":
            return _broadcast(args)
        if args.command == "check":
            return _check(args.services)
        if args.command in _SERVICE_COMMANDS:
            return _service_command(args)
        if args.command in _STREAM_HELP:
            return _stream(args)
        return _admin(args)
    except OPERATOR_ERRORS as exc:
        _report(exc)
        return ExitStatus.OPERATOR
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; an operator error (socket in use,
        # insecure directory, no broker) is reported as one line, not a traceback.
        matched, rest = group.split(OPERATOR_ERRORS)
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            _report(leaf)
        return ExitStatus.OPERATOR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
