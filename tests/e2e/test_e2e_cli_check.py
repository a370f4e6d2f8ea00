"""``rpbroker check --services DIR`` as a real process: every problem, file, field and fix.

Exit status 1 when anything is wrong (a problem per line on stdout), 0 when the
directory is clean. The broker's own start-up check uses the same code, so what
``check`` prints is what a starting broker refuses or logs.
"""

from __future__ import annotations

import os

import trio

from rpbroker.services import MAX_DEFINITION_BYTES

from .support import Workspace
from .test_e2e_supervision_helpers import run_cli

NOBODY = 65534


async def check(workspace: Workspace) -> tuple[int, list[str]]:
    with trio.fail_after(30):
        result = await run_cli("check", "--services", str(workspace.services))
    assert result.stderr == ""
    return result.returncode, result.stdout.splitlines()


async def test_a_clean_directory_exits_0(workspace: Workspace) -> None:
    workspace.add_service("echo")
    workspace.add_service("other")
    code, lines = await check(workspace)
    assert (code, lines) == (0, [f"{workspace.services}: 2 service definition(s), no problems"])


async def test_every_problem_is_printed_with_file_field_and_fix(workspace: Workspace) -> None:
    svc = workspace.services
    workspace.add_service("echo")  # good: not mentioned
    workspace.add_service("timeout", idle_timeout_secs=-1)
    workspace.add_service("foreign")
    os.chown(svc / "foreign.toml", NOBODY, NOBODY)
    workspace.add_service("loose")
    (svc / "loose.toml").chmod(0o644)
    os.mkfifo(svc / "fifo.toml", 0o600)
    (svc / "renamed.toml").write_text('service_name = "other"\ncommand = ["/bin/true"]\n')
    (svc / "renamed.toml").chmod(0o600)
    (svc / "Upper.toml").write_text("")
    (svc / "Upper.toml").chmod(0o600)
    (svc / "huge.toml").write_bytes(b"#" * (MAX_DEFINITION_BYTES + 1))
    (svc / "huge.toml").chmod(0o600)
    (svc / "notes.txt").write_text("not a definition")  # ignored
    code, lines = await check(workspace)
    assert code == 1
    euid = os.geteuid()
    assert lines == [
        f"{svc}/Upper.toml: the file name 'Upper' is not a service name, so no Hello can "
        "load it: rename it to 1-64 characters from a-z, 0-9 and '-'",
        f"{svc}/fifo.toml: is a FIFO (named pipe); only regular files are read; "
        f"remove it (rm -r {svc}/fifo.toml) and write a regular file in its place",
        f"{svc}/foreign.toml: is owned by uid {NOBODY}, not by the current user (uid {euid}); "
        f"run: chown {euid} {svc}/foreign.toml",
        f"{svc}/huge.toml: is larger than {MAX_DEFINITION_BYTES} bytes, the limit for a "
        "definition (a definition is a few hundred bytes): shorten it",
        f"{svc}/loose.toml: has mode 0644, which gives group or other users access; "
        f"run: chmod 600 {svc}/loose.toml",
        f"{svc}/renamed.toml: field 'service_name': file declares 'other' but was loaded as "
        "'renamed': set service_name = \"renamed\" or rename the file",
        f"{svc}/timeout.toml: field 'idle_timeout_secs': must be a finite number of seconds "
        "greater than 0 (got -1.0)",
        f"7 problem(s) in {svc}",
    ]


async def test_an_insecure_directory_exits_1_with_the_fix(workspace: Workspace) -> None:
    workspace.add_service("echo")
    workspace.services.chmod(0o750)
    code, lines = await check(workspace)
    assert code == 1
    assert lines == [
        f"services directory {workspace.services} has mode 0750, which gives group or other "
        "users access; definitions are only loaded from a directory private to the broker's "
        f"user: run: chmod 700 {workspace.services}"
    ]
