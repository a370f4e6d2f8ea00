"""Fixtures for the command-line tests: the end-to-end tests' private workspace."""

from __future__ import annotations

from ..e2e.conftest import workspace

__all__ = ["workspace"]
