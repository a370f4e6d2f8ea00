"""Fixtures for the transport tests: short private socket directories and child environments.

What this module does: gives each test a fresh 0700 directory with a short path (so
socket paths fit in ``sun_path``) and the environment a child Python process needs
to import this repository's ``transports`` package.

What it does not do: start processes or sockets itself; the tests do that with the
real transport functions.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The Unix transport tests cannot run on Windows; the Windows transport has its own.
collect_ignore_glob = ["test_unix_*.py"] if sys.platform == "win32" else []

#: Root of the repository (tests/transports/conftest.py -> repo), put on the child's
#: PYTHONPATH so ``import transports`` finds this checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh private (0700) directory under /tmp with a short path, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rpbt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def child_env() -> dict[str, str]:
    """The current environment plus this repository on ``PYTHONPATH``."""
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = (
        str(REPO_ROOT) if not existing else os.pathsep.join([str(REPO_ROOT), existing])
    )
    return env
