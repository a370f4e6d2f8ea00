"""What an installed rpbroker looks like from outside: metadata, contents, the pytest plugin.

The plugin tests run a real ``pytest`` in a subprocess on a tiny project of their
own (outside this repository's configuration), the way a user's test-suite would
load the testing kit.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rpbroker
from rpbroker.client import CLIENT_LIB_VERSION, hello_frame
from rpbroker.wire import Hello
from rpbroker.wire.frames import decode, decode_frame

REPO = Path(__file__).resolve().parents[2]

#: Bound on one subprocess pytest run, seconds: it starts an interpreter and one
#: in-process broker; generous because the machine is shared.
PYTEST_RUN_TIMEOUT_S = 120


def test_version_comes_from_the_installed_metadata() -> None:
    installed = importlib.metadata.version("rpbroker")
    assert rpbroker.__version__ == installed
    assert installed == CLIENT_LIB_VERSION
    body = hello_frame("svc", "1.0.0", handoff=False)[5:]
    hello = decode(Hello, decode_frame(body).payload)
    assert hello.client_lib_version == installed


def test_license_is_an_spdx_expression_with_its_file() -> None:
    meta = importlib.metadata.metadata("rpbroker")
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the rpbroker authors" in text


def test_test_doubles_are_not_installed() -> None:
    assert importlib.util.find_spec("transports._windows_fakes") is None
    spec = importlib.util.find_spec("transports")
    assert spec is not None and spec.origin is not None
    assert [p.name for p in Path(spec.origin).parent.glob("*fake*")] == []


def _platform_checks(path: Path) -> list[str]:
    """``os.name`` / ``sys.platform`` / ``platform.system()`` uses in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr)
            in {("os", "name"), ("sys", "platform"), ("platform", "system")}
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_nothing_above_transports_branches_on_the_platform() -> None:
    offenders = [
        hit
        for path in sorted((REPO / "rpbroker").rglob("*.py"))
        if "_pb" not in path.parts
        for hit in _platform_checks(path)
    ]
    assert offenders == []


# -- the pytest plugin, loaded by a user's pytest -----------------------------------

USER_TEST = """
import pytest
import trio

from rpbroker.testing import FakeService


@pytest.mark.trio
async def test_kit_fixture_serves_a_fake_backend(rpbroker_test_broker):
    rpbroker_test_broker.add_service("echo", FakeService())
    stream = await rpbroker_test_broker.connect("echo", "1.0.0", initial_data=b"ping")
    async with stream:
        assert await stream.receive_some(4) == b"ping"
"""


def _run_user_pytest(
    project: Path, conftest: str | None, *, autoload: bool
) -> subprocess.CompletedProcess[str]:
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_user.py").write_text(USER_TEST)
    if conftest is not None:
        (project / "conftest.py").write_text(conftest)
    env = dict(os.environ)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        args += ["-p", "pytest_trio.plugin"]
    return subprocess.run(
        args,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=PYTEST_RUN_TIMEOUT_S,
        check=False,
    )


def test_plugin_loads_automatically_from_its_entry_point(tmp_path: Path) -> None:
    result = _run_user_pytest(tmp_path, None, autoload=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


DOCUMENTED_CONFTEST = 'pytest_plugins = ["rpbroker.testing.pytest_plugin"]\n'


@pytest.mark.parametrize("autoload", [True, False], ids=["autoload", "autoload-disabled"])
def test_plugin_loads_as_documented_in_conftest(tmp_path: Path, autoload: bool) -> None:
    # With autoload on, the entry point has registered the plugin already: listing it
    # again must not register it twice (pluggy would raise).
    result = _run_user_pytest(tmp_path, DOCUMENTED_CONFTEST, autoload=autoload)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_without_the_plugin_the_fixture_is_missing(tmp_path: Path) -> None:
    # The control for the two tests above: nothing else provides the fixture.
    result = _run_user_pytest(tmp_path, None, autoload=False)
    assert result.returncode != 0
    assert "fixture 'rpbroker_test_broker' not found" in result.stdout
