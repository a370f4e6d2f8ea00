"""Fixtures for end-to-end tests: a private workspace and a live broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import rpbroker
from rpbroker.client import forget_cached_endpoints

from .support import Workspace, make_workspace, remove_tree


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    forget_cached_endpoints()
    ws = make_workspace()
    try:
        yield ws
    finally:
        remove_tree(ws.root)


@pytest.fixture
def echo_workspace(workspace: Workspace) -> Workspace:
    workspace.add_service("echo", min_version="1.0.0")
    return workspace


@pytest.fixture
async def broker(echo_workspace: Workspace) -> AsyncIterator[rpbroker.Broker]:
    async with rpbroker.open_broker(echo_workspace.config()) as running:
        yield running
