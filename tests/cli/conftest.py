"""Fixtures for the command-line tests: a private workspace per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rpbroker.client import forget_cached_endpoints

from ..e2e.support import Workspace, make_workspace, remove_tree


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    forget_cached_endpoints()
    ws = make_workspace()
    try:
        yield ws
    finally:
        remove_tree(ws.root)
