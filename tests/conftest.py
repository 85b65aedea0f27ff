"""The fixtures, thin wrappers over tests/helpers (where the harness lives: tests import it from
there, never from this file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from imprint.tokens import Mode

from tests.helpers import AgentFactory, Owner


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[AgentFactory]:
    """Real agents on guest roots under tmp_path, all killed at teardown."""
    factory = AgentFactory(tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def owner(tmp_path: Path) -> Owner:
    """A fresh owner (`imprint init` done) with its home under tmp_path."""
    return Owner.create(tmp_path / "owner-home")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real QEMU VMs from the image-build image (CI runs them)")
    config.addinivalue_line("markers", "slow: long-running (CI runs them)")


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """A mode's test id is its value ("shared", "nosecret"), as the CLI spells it."""
    return val.value if isinstance(val, Mode) else None
