"""Shared fixtures. Azurite and the sandbox are started on loopback by the plugins below and stopped after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from d365_migration import _app

pytest_plugins = ["tests._azurite_plugin", "tests._sandbox_plugin"]

# Property tests judge what the code does, never how fast: no per-example deadline, and no "input generation is slow"
# failure when the two test processes share two cores with Azurite and the sandbox (timing is `make bench`'s job).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(autouse=True)
def fresh_services() -> Iterator[None]:
    """The app builds one service per event loop and reads settings when it does; host.json's dequeue limit is
    cached. No test may inherit another test's."""
    _app.forget_services()
    yield
    _app.forget_services()
