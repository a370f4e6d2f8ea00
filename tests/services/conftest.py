"""Fixtures for the service-definition tests.

What this module does: runs every test here under umask 077, so the definition
files the tests write are 0600, as the file rule demands (files a test wants
insecure are ``chmod``-ed explicitly).

What it does not do: create directories or files (each test does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

#: Leaves only owner bits on new files (0600) and directories (0700).
PRIVATE_UMASK = 0o077


@pytest.fixture(autouse=True)
def private_umask() -> Iterator[None]:
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)
