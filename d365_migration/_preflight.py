"""Quick reachability checks for the local commands: a wrong storage port or an unreachable Partner Center becomes one
clear line naming the setting, in seconds, instead of minutes of SDK retries and a traceback.

Only connectivity is checked (no retries, short timeouts): any HTTP answer means "reachable"; what the answer says is
for the real calls to judge.
"""

from __future__ import annotations

import asyncio

from ._exceptions import ConfigurationError
from ._settings import Settings

__all__ = ["check_partner_center", "check_storage"]

_TIMEOUT_SECONDS = 5.0


def _storage_target(settings: Settings) -> tuple[str, str]:
    """(setting name, where it points) for error messages; never the account key."""
    if settings.storage_connection:
        parts = dict(p.split("=", 1) for p in settings.storage_connection.split(";") if "=" in p)
        where = parts.get("TableEndpoint") or parts.get("AccountName") or "the configured account"
        return "AzureWebJobsStorage", where
    return "AzureWebJobsStorage__tableServiceUri", settings.storage_table_uri or "the configured account"


async def check_storage(settings: Settings) -> None:
    """:raises ConfigurationError: the ledger's storage account cannot be reached (names the setting)."""
    if not settings.storage_connection:
        return  # identity-based storage (Azure): the SDK's own errors are clear enough there
    from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
    from azure.data.tables import TableServiceClient

    name, where = _storage_target(settings)

    def probe() -> None:
        with TableServiceClient.from_connection_string(settings.storage_connection or "", retry_total=0,
                                                       connection_timeout=_TIMEOUT_SECONDS,
                                                       read_timeout=_TIMEOUT_SECONDS) as service:
            next(iter(service.list_tables(results_per_page=1)), None)

    try:
        await asyncio.to_thread(probe)
    except ClientAuthenticationError:
        raise ConfigurationError(name, f"the storage account at {where} refused the credentials",
                                 "check the account key in the connection string") from None
    except HttpResponseError:
        return  # it answered: reachable
    except (AzureError, ValueError) as exc:
        raise ConfigurationError(name, f"cannot reach the storage account at {where} ({type(exc).__name__})",
                                 "start Azurite (`npx azurite`) or fix the connection string's endpoints") from None


async def check_partner_center(settings: Settings) -> None:
    """:raises ConfigurationError: nothing answers at ``PARTNER_CENTER_ENDPOINT`` (names the setting)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT_SECONDS) as client:
            await client.get(settings.endpoint.rstrip("/") + "/v1/")
    except httpx.TransportError as exc:
        raise ConfigurationError("PARTNER_CENTER_ENDPOINT",
                                 f"cannot connect to {settings.endpoint} ({type(exc).__name__})",
                                 "check the URL and the network; locally, start the sandbox with "
                                 "`python -m d365_migration sandbox`") from None
