"""A broker's start-up checks: what would otherwise fail at the first Hello is refused now.

What this module does: ``check_broker_start`` runs once, from ``Broker.serve``,
before the broker binds its endpoint, and either raises a typed error whose
message names the path, the problem and the fix, or returns a ``StartupReport``.
In order:

1. backend endpoint names in the runtime directory (``BrokerConfig.runtime_dir``,
   else the per-user default) must fit the platform's socket path limit: else
   ``transports.RuntimeDirTooLongError`` with the byte counts (nothing is created);
2. the runtime directory is created 0700 if missing (one level), and must then be
   a real directory (not a symbolic link) owned by the broker's user with no
   group/other permission bits: else ``transports.InsecurePathError``;
3. dead backend endpoint sockets of this user in it (left by a broker that was
   killed) are removed, each logged at INFO; nothing else is touched;
4. the services directory must pass the directory rule of ``rpbroker.services``:
   else a ``ServiceDirectoryError``;
5. every definition in it is loaded as a Hello would load it: a file that fails
   the file rule refuses the start (``InsecureServiceFiles``, naming every such
   file); an invalid definition is logged at WARNING with its file, field and fix,
   and the broker serves the others;
6. every foreign backend's endpoint template, filled in as a spawn would fill it,
   must fit the platform's limit: else ``ForeignEndpointTooLong`` naming the file
   and the field.

The checks are synchronous, for the same reason as the per-Hello load (see
``rpbroker.services``): every step is bounded (``lstat``, ``mkdir``, one
``scandir``, non-blocking connects, reads of at most ``MAX_DEFINITION_BYTES`` from
files proven regular), and a worker thread would let ``MockClock`` jump in tests.

What it does not do: check the broker's own socket path (``open_listener`` does:
its directory, its length, squatting and a stale socket there), or repeat anything
at Hello time (the service catalog re-applies the directory and file rules at
every load, and refuses the Hello if they fail later).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs

import transports
from rpbroker.config import BrokerConfig
from rpbroker.errors import BrokerError
from rpbroker.servicecheck import DefinitionProblem, ServicesReport, check_services_directory
from rpbroker.services import ENDPOINT_TOKEN_HEX_DIGITS, ServiceLoadError, load_service

__all__ = ["ForeignEndpointTooLong", "InsecureServiceFiles", "StartupReport", "check_broker_start"]

logger = logging.getLogger("rpbroker.preflight")


class InsecureServiceFiles(BrokerError):
    """Definition files fail the file rule; the broker refuses to start.

    ``problems`` lists each file with what is wrong and the fix.
    """

    def __init__(self, directory: Path, problems: tuple[DefinitionProblem, ...]) -> None:
        lines = "".join(f"\n  {problem}" for problem in problems)
        super().__init__(
            f"refusing to start: {len(problems)} definition file(s) in {directory} are not "
            f"regular files private to the broker's user:{lines}"
        )
        self.directory = directory
        self.problems = problems


@attrs.frozen
class StartupReport:
    """What the start-up checks found and did."""

    runtime_dir: Path
    removed_endpoints: tuple[str, ...]
    services: ServicesReport


class ForeignEndpointTooLong(BrokerError):
    """A foreign backend's endpoint, filled in, does not fit the platform's limit."""

    def __init__(self, source: Path, endpoint: str, problem: str) -> None:
        super().__init__(
            f"refusing to start: {source}: field 'foreign.endpoint': filled in as "
            f"{endpoint!r}, it cannot be used: {problem}. Shorten the template "
            "(or the runtime directory it starts with)"
        )
        self.source = source
        self.endpoint = endpoint


def _check_foreign_endpoint(directory: Path, name: str, runtime: os.PathLike[str] | str) -> None:
    """Fill ``name``'s foreign endpoint template as a spawn would, and check its length.

    The version filled in is the longest the definition names (allow list,
    minimum version), else ``0.0.0``; a longer version asked for in a Hello is
    checked again at its spawn (which then fails with the same message).
    """
    try:
        spec = load_service(directory, name)
    except ServiceLoadError:
        return  # changed since it was checked: the Hello's load reports it
    if spec.foreign is None:
        return
    versions = [*spec.version_allow_list, spec.min_version or "0.0.0"]
    endpoint = spec.foreign.endpoint_for(
        os.fspath(runtime), name, max(versions, key=len), "0" * ENDPOINT_TOKEN_HEX_DIGITS
    )
    try:
        transports.check_endpoint_name(endpoint)
    except transports.EndpointNameError as exc:
        raise ForeignEndpointTooLong(spec.source, endpoint, str(exc)) from None


def check_broker_start(config: BrokerConfig) -> StartupReport:
    """Check (and prepare) the runtime and services directories; see the module docstring.

    Raises ``transports.InsecurePathError``, ``transports.RuntimeDirTooLongError``,
    ``rpbroker.services.ServiceDirectoryError``, ``InsecureServiceFiles`` or
    ``ForeignEndpointTooLong``.
    """
    runtime = config.runtime_dir or transports.runtime_dir(create=False)
    transports.check_backend_endpoint_room(runtime)
    transports.ensure_private_dir(runtime)
    removed = tuple(transports.remove_stale_backend_endpoints(runtime))
    for path in removed:
        logger.info("removed the stale endpoint %s of a backend that is gone", path)
    services = check_services_directory(config.services_dir)
    if services.insecure:
        raise InsecureServiceFiles(services.directory, services.insecure)
    for name in services.services:
        _check_foreign_endpoint(services.directory, name, runtime)
    for problem in services.invalid:
        logger.warning("service definition cannot be used, its Hellos are refused: %s", problem)
    return StartupReport(runtime_dir=Path(runtime), removed_endpoints=removed, services=services)
