"""pytest plugin: a private Azurite for the session, and a clean account for each test.

* ``azurite`` (session): the connection string. If ``AZURITE_CONNECTION_STRING`` is set, that Azurite (or
  account) is used and nothing is started; otherwise ``node_modules/.bin/azurite`` is started on loopback with
  free ports and in-memory storage (run ``npm ci`` first), and stopped at the end of the session.
* ``storage`` (function): the same connection string, after deleting every queue and table in the account,
  so a test never sees another test's data. Do not point ``AZURITE_CONNECTION_STRING`` at an account whose
  data you want to keep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueServiceClient

from d365_migration.localhost.azurite import AzuriteProcess


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Connection string of an Azurite that lives for the whole test session."""
    external = os.environ.get("AZURITE_CONNECTION_STRING")
    if external:
        yield external
        return
    with AzuriteProcess() as process:
        yield process.connection_string


def wipe_account(connection_string: str) -> None:
    """Delete every queue and table in the account."""
    with QueueServiceClient.from_connection_string(connection_string) as queues:
        for queue in list(queues.list_queues()):
            with contextlib.suppress(ResourceNotFoundError):
                queues.delete_queue(queue.name)
    with TableServiceClient.from_connection_string(connection_string) as tables:
        for table in list(tables.list_tables()):
            with contextlib.suppress(ResourceNotFoundError):
                tables.delete_table(table.name)


@pytest.fixture
def storage(azurite: str) -> Iterator[str]:
    """The Azurite connection string, with no queues or tables left from earlier tests."""
    wipe_account(azurite)
    yield azurite
