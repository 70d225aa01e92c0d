"""Fixtures for tests on real clusters: labs of network namespaces, always torn down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Lab, cleanup_stale

LAB_FIXTURES = frozenset({"lab", "lab2"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a lab needs root: mark it, so the suite's root rule applies to it."""
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def stale_labs_removed() -> None:
    """Remove namespaces a crashed earlier run left (labs still in use are kept)."""
    if os.geteuid() == 0:
        cleanup_stale()


@pytest.fixture
def lab(tmp_path: Path, stale_labs_removed: None) -> Iterator[Lab]:
    """node1, node2, client and witness on one network (198.18.0.0/24)."""
    with Lab(tmp_path / "lab", heartbeat_networks=1, witness=True) as built:
        yield built


@pytest.fixture
def lab2(tmp_path: Path, stale_labs_removed: None) -> Iterator[Lab]:
    """As `lab`, with a second heartbeat network (198.18.1.0/24) between the nodes."""
    with Lab(tmp_path / "lab", heartbeat_networks=2, witness=True) as built:
        yield built
