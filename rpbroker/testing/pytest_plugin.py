"""pytest fixtures for the rpbroker testing kit (needs pytest and pytest-trio).

They load automatically wherever rpbroker is installed (a ``pytest11`` entry
point named ``rpbroker.testing.pytest_plugin``; ``-p
no:rpbroker.testing.pytest_plugin`` turns them off). With plugin autoloading
disabled (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``) enable them in your top-level
``conftest.py``::

    pytest_plugins = ["rpbroker.testing.pytest_plugin"]

(harmless when autoloading is on), or import the fixture functions you want into
a ``conftest.py``.

- ``rpbroker_test_broker``: a running ``TestBroker`` with no services yet (add
  them with ``TestBroker.add_service``); shut down after the test.
- ``rpbroker_test_broker_factory``: ``open_test_broker`` with ``tmp_path`` bound,
  for tests that need services or configuration from the start::

      async def test_x(rpbroker_test_broker_factory, autojump_clock):
          async with rpbroker_test_broker_factory({"svc": FakeService()}) as tb:
              ...

Request pytest-trio's ``autojump_clock`` in the test function to run on
``trio.testing.MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from rpbroker.testing._broker import TestBroker, open_test_broker

TestBrokerFactory = Callable[..., AbstractAsyncContextManager[TestBroker]]


@pytest.fixture
def rpbroker_test_broker_factory(tmp_path: Path) -> TestBrokerFactory:
    """``open_test_broker`` with the test's ``tmp_path`` already bound."""
    return functools.partial(open_test_broker, tmp_path)


@pytest.fixture
async def rpbroker_test_broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    """A running test broker with no services; shut down gracefully after the test.

    Cancellation: as ``open_test_broker``; nothing outlives the test.
    """
    async with open_test_broker(tmp_path) as test_broker:
        yield test_broker


__all__ = ["TestBrokerFactory", "rpbroker_test_broker", "rpbroker_test_broker_factory"]
