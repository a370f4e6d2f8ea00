"""The ``rpbroker`` command line: run a broker, query it, broadcast to its backends.

What this module does: maps command-line flags onto ``BrokerConfig`` and runs a
broker in the foreground (SIGINT/SIGTERM shut it down gracefully and remove the
socket file; under systemd it serves the socket passed to it, leaves that file in
place, and reports readiness with ``sd_notify``), and sends admin verbs and
broadcast requests to a running broker, printing the reply (JSON with
``--json`` where it applies) and exiting with the reply's exit code.
``rpbroker check`` validates a services directory offline.

What it does not do: daemonise, or read configuration files other than the
service definitions the broker itself loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

import transports
from rpbroker.admin_client import admin_request, broadcast_request
from rpbroker.broker import Broker, serve_broker
from rpbroker.config import BrokerConfig, ServiceManager
from rpbroker.errors import BrokerError
from rpbroker.policy.broadcast import BroadcastOperation, Quiesce, QuiesceReason, ReleaseHandles
from rpbroker.services import ServiceLoadError
from rpbroker.wire.codes import AdminVerb

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpbroker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a broker in the foreground")
    serve.add_argument(
        "--socket",
        default=None,
        help="broker endpoint path (default: the socket systemd passed, else the per-user "
        "shared endpoint)",
    )
    serve.add_argument(
        "--services", required=True, help="service definitions directory (mode 0700)"
    )
    serve.add_argument("--hello-timeout", type=float, default=30.0, metavar="SECONDS")
    serve.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS")
    serve.add_argument("--runtime-dir", default=None, help="where backend endpoints are created")
    serve.add_argument("--no-handoff", action="store_true", help="always use the reconnect route")
    serve.add_argument(
        "--hello-rate-limit",
        type=int,
        default=256,
        metavar="N",
        help="Hellos per second per peer pid",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    for name in _VERBS:
        verb = sub.add_parser(name, help=f"admin {name}")
        verb.add_argument("--socket", required=True)
        verb.add_argument("--json", action="store_true", help="JSON output where it applies")
        verb.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
        if name == "backend-health":
            verb.add_argument("service", help="service name")
        if name == "shutdown":
            verb.add_argument("--drain-deadline-ms", type=int, default=0)

    broadcast = sub.add_parser("broadcast", help="send a lifecycle broadcast to every backend")
    ops = broadcast.add_subparsers(dest="operation", required=True)
    quiesce = ops.add_parser("quiesce", help="stop, drain and exit every backend")
    quiesce.add_argument(
        "--reason",
        default="maintenance",
        choices=["maintenance", "idle-timeout", "broker-shutdown"],
    )
    release = ops.add_parser("release-handles", help="ask backends to release handles under PREFIX")
    release.add_argument("prefix")
    for op in (quiesce, release):
        op.add_argument("--socket", required=True)
        op.add_argument("--json", action="store_true")
        op.add_argument("--ack-timeout", type=float, default=None, metavar="SECONDS")
        op.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    _add_check_parser(sub)
    return parser


def _add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check", help="validate a services directory offline (exit 1 if any problem)"
    )
    check.add_argument("--services", required=True, help="service definitions directory")


def _run_check(services: str) -> int:
    """``rpbroker check``: print every problem (file, field, fix); 1 if any, else 0."""
    # Imported here so this command stays one self-contained piece of the module.
    from rpbroker.servicecheck import check_services_directory
    from rpbroker.services import ServiceDirectoryError

    try:
        report = check_services_directory(services)
    except ServiceDirectoryError as exc:
        print(exc)
        return 1
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {report.directory}")
        return 1
    print(f"{report.directory}: {len(report.services)} service definition(s), no problems")
    return 0


async def _serve(config: BrokerConfig) -> None:
    async with trio.open_nursery() as nursery:
        broker: Broker = await nursery.start(serve_broker, config)
        print(f"rpbroker: serving on {broker.socket_path}", file=sys.stderr, flush=True)
        nursery.start_soon(_shutdown_on_signal, broker)
        await broker.wait_stopped()
        nursery.cancel_scope.cancel()


async def _shutdown_on_signal(broker: Broker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            print(f"rpbroker: {name}: shutting down", file=sys.stderr, flush=True)
            broker.request_shutdown()


def _print_document(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True))
        return
    for key, value in document.items():
        if isinstance(value, list | dict):
            value = json.dumps(value, sort_keys=True)
        print(f"{key}: {value}")


#: Errors that are the operator's to fix, reported as one line and exit status 3.
OPERATOR_ERRORS = (BrokerError, transports.TransportError, ServiceLoadError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _run_check(args.services)
    try:
        if args.command == "serve":
            logging.basicConfig(
                level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            config = BrokerConfig(
                services_dir=args.services,
                socket_path=args.socket,
                runtime_dir=args.runtime_dir,
                hello_timeout_s=args.hello_timeout,
                drain_timeout_s=args.drain_timeout,
                handoff_enabled=not args.no_handoff,
                hello_rate_limit=args.hello_rate_limit,
                # Socket activation and sd_notify when systemd started us; inert otherwise.
                service_manager=ServiceManager.SYSTEMD,
            )
            trio.run(_serve, config)
            return 0
        if args.command == "broadcast":
            operation: BroadcastOperation
            if args.operation == "quiesce":
                operation = Quiesce(QuiesceReason(args.reason.replace("-", "_")))
            else:
                operation = ReleaseHandles(args.prefix)
            document = trio.run(
                partial(
                    broadcast_request,
                    args.socket,
                    operation,
                    ack_timeout_s=args.ack_timeout,
                    timeout_s=args.timeout,
                )
            )
            _print_document(document, args.json)
            return 0 if not document.get("timeouts") and not document.get("failures") else 1
        verb = _VERBS[args.command]
        reply = trio.run(
            partial(
                admin_request,
                args.socket,
                verb,
                json_output=args.json,
                service_name=getattr(args, "service", ""),
                drain_deadline_ms=getattr(args, "drain_deadline_ms", 0),
                timeout_s=args.timeout,
            )
        )
        body = reply.body
        if args.json and reply.content_type == "application/json":
            body = json.dumps(json.loads(body), indent=2, sort_keys=True) + "\n"
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
        return int(reply.exit_code)
    except OPERATOR_ERRORS as exc:
        print(f"rpbroker: {exc}", file=sys.stderr)
        return 3
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; an operator error (socket in use,
        # insecure directory, no broker) is reported as one line, not a traceback.
        matched, rest = group.split(OPERATOR_ERRORS)
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            print(f"rpbroker: {leaf}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
