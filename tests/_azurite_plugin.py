"""pytest plugin: a private Azurite for the session, and a clean account for each test.

* ``azurite`` (session): the connection string. If ``AZURITE_CONNECTION_STRING`` is set, that Azurite (or
  account) is used and nothing is started; otherwise ``node_modules/.bin/azurite`` is started on loopback with
  free ports and in-memory storage (run ``npm ci`` first), and stopped at the end of the session.
* ``storage`` (function): the same connection string, after deleting every queue and table in the account,
  so a test never sees another test's data. Do not point ``AZURITE_CONNECTION_STRING`` at an account whose
  data you want to keep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from d365_tooling.localhost.azurite import AzuriteProcess, wipe_account


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Connection string of an Azurite that lives for the whole test session."""
    external = os.environ.get("AZURITE_CONNECTION_STRING")
    if external:
        if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
            # Every test wipes the account it uses: two processes on one account would wipe each other's data.
            pytest.fail("AZURITE_CONNECTION_STRING is one account, shared by every test process; run one process "
                        "(`make test TEST_PROCESSES=0`, or pytest without -n) or unset it", pytrace=False)
        yield external
        return
    with AzuriteProcess() as process:
        yield process.connection_string




@pytest.fixture
def storage(azurite: str) -> Iterator[str]:
    """The Azurite connection string, with no queues or tables left from earlier tests."""
    wipe_account(azurite)
    yield azurite
