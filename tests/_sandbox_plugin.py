"""pytest plugin: a Partner Center sandbox server per test.

* ``sandbox`` (function): a running ``SandboxServer`` with a small seeded world (8 customers, seed 1, today's date).
  ``sandbox.url``, ``sandbox.state``, ``sandbox.config`` and ``sandbox.manifest`` are available.
* ``sandbox_factory`` (function): ``sandbox_factory(customers=8, seed=1, today=None, config=None, **config_fields)``
  builds and starts another one (stopped at the end of the test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import pytest

from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState, seed_world

SandboxFactory = Callable[..., SandboxServer]


@pytest.fixture
def sandbox_factory() -> Iterator[SandboxFactory]:
    servers: list[SandboxServer] = []

    def make(
        *, customers: int = 8, seed: int = 1, today: date | None = None, config: SandboxConfig | None = None,
        **config_fields: Any,
    ) -> SandboxServer:
        state = SandboxState()
        if customers:
            seed_world(state, customers=customers, seed=seed, today=today)
        cfg = config if config is not None else SandboxConfig()
        for key, value in config_fields.items():
            if not hasattr(cfg, key):
                raise TypeError(f"unknown SandboxConfig field {key!r}")
            setattr(cfg, key, value)
        server = SandboxServer(state, cfg).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def sandbox(sandbox_factory: SandboxFactory) -> SandboxServer:
    return sandbox_factory()
