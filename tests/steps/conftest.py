"""Fixtures of the step tests: a fresh sandbox state and a server over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState


@pytest.fixture
def state() -> SandboxState:
    return SandboxState()


@pytest.fixture
def server(state: SandboxState) -> Iterator[SandboxServer]:
    with SandboxServer(state, SandboxConfig()) as srv:
        yield srv
