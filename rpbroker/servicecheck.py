"""Checking a whole services directory at once: for broker start-up and ``rpbroker check``.

What this module does: ``check_services_directory`` applies the directory rule of
:mod:`rpbroker.services`, then loads every definition in the directory exactly as
a Hello would (TOML wins over ``.servicedef``) and returns a ``ServicesReport``:
the names that load, and one ``DefinitionProblem`` per file that does not, with
its path, the field at fault (when one is) and a message that says what is wrong
and how to fix it. Each problem has a kind: ``INSECURE`` (the file fails the file
rule: a link, FIFO, device or directory, another owner, group/other bits) or
``INVALID`` (its content or its name is wrong).

What it does not do: decide what a problem means for a broker (``rpbroker.preflight``
refuses to start on an insecure file and logs invalid ones) or print anything
(the CLI does). A ``.servicedef`` shadowed by a ``.toml`` of the same name is not
read, as the broker never reads it.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import attrs

from rpbroker.policy.hello import is_valid_service_name
from rpbroker.services import (
    SERVICEDEF_SUFFIX,
    TOML_SUFFIX,
    InsecureServiceFile,
    ServiceDefinitionError,
    ServiceNotFound,
    definition_entries,
    load_service,
)

__all__ = [
    "DefinitionProblem",
    "ProblemKind",
    "ServicesReport",
    "check_services_directory",
]


class ProblemKind(enum.Enum):
    """Whether a definition file is unsafe to read or just wrong."""

    #: Fails the file rule: never read; a broker refuses to start.
    INSECURE = "insecure"
    #: Wrong content or file name: a broker starts and refuses this service's Hellos.
    INVALID = "invalid"


@attrs.frozen
class DefinitionProblem:
    """One definition file that cannot be used, and what to do about it."""

    path: Path
    field: str | None
    message: str
    kind: ProblemKind

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field is not None else ""
        return f"{self.path}: {where}{self.message}"


@attrs.frozen
class ServicesReport:
    """What ``check_services_directory`` found: loadable names and problems, both sorted."""

    directory: Path
    services: tuple[str, ...]
    problems: tuple[DefinitionProblem, ...]

    @property
    def insecure(self) -> tuple[DefinitionProblem, ...]:
        """The problems of kind ``INSECURE``."""
        return tuple(p for p in self.problems if p.kind is ProblemKind.INSECURE)

    @property
    def invalid(self) -> tuple[DefinitionProblem, ...]:
        """The problems of kind ``INVALID``."""
        return tuple(p for p in self.problems if p.kind is ProblemKind.INVALID)


def _misnamed(directory: Path, stem: str) -> DefinitionProblem:
    suffix = TOML_SUFFIX if (directory / f"{stem}{TOML_SUFFIX}").exists() else SERVICEDEF_SUFFIX
    return DefinitionProblem(
        path=directory / f"{stem}{suffix}",
        field=None,
        message=(
            f"the file name {stem!r} is not a service name, so no Hello can load it: "
            "rename it to 1-64 characters from a-z, 0-9 and '-'"
        ),
        kind=ProblemKind.INVALID,
    )


def check_services_directory(directory: os.PathLike[str] | str) -> ServicesReport:
    """Load every definition in ``directory`` and report the ones that fail.

    Raises :class:`rpbroker.services.ServiceDirectoryError` when the directory
    itself fails the directory rule (nothing in it is read then). Synchronous and
    bounded like a Hello's load: each file is refused before it is opened unless it
    is a regular file, and at most ``MAX_DEFINITION_BYTES`` of it are read.
    """
    root = Path(os.path.abspath(directory))
    services: list[str] = []
    problems: list[DefinitionProblem] = []
    for stem in sorted(definition_entries(root)):
        if not is_valid_service_name(stem):
            problems.append(_misnamed(root, stem))
            continue
        try:
            load_service(root, stem)
        except InsecureServiceFile as exc:
            problems.append(DefinitionProblem(exc.path, None, exc.message, ProblemKind.INSECURE))
        except ServiceDefinitionError as exc:
            problems.append(
                DefinitionProblem(exc.path, exc.field, exc.message, ProblemKind.INVALID)
            )
        except ServiceNotFound:
            continue  # removed while we looked
        else:
            services.append(stem)
    return ServicesReport(directory=root, services=tuple(services), problems=tuple(problems))
