"""A faithful, in-memory Partner Center sandbox (Starlette/uvicorn) for tests and local runs.

    state = SandboxState()
    manifest = seed_world(state, customers=20, seed=1)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=0.5)) as srv:
        httpx.get(f"{srv.url}/v1/customers?size=10")
"""

from ._app import SandboxApp, create_app
from ._catalog import (
    ALL_SKUS,
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    QO_SKUS,
    REPLACEMENT_SKUS,
    RETIRED_OFFERS,
    CatalogItem,
    ProductSku,
    catalog_item,
    product_mapping,
    sku_for_offer,
)
from ._config import DEMO_BEHAVIOURS, PENDING_BEHAVIOURS, FaultConfig, SandboxConfig
from ._faults import is_app_only, make_token
from ._seed import QO_DISTRACTOR_KINDS, Distractor, ExpectedMigration, PooledSku, SeedManifest, seed_world
from ._server import SandboxServer
from ._state import ApiError, SandboxState

__all__ = [
    "ALL_SKUS",
    "DEMO_BEHAVIOURS",
    "DEMO_REPLACEMENT_OFFERS",
    "LEGACY_REPLACEMENT_OFFERS",
    "PENDING_BEHAVIOURS",
    "QO_DISTRACTOR_KINDS",
    "QO_SKUS",
    "REPLACEMENT_SKUS",
    "RETIRED_OFFERS",
    "ApiError",
    "CatalogItem",
    "Distractor",
    "ExpectedMigration",
    "FaultConfig",
    "PooledSku",
    "ProductSku",
    "SandboxApp",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "SeedManifest",
    "catalog_item",
    "create_app",
    "is_app_only",
    "make_token",
    "product_mapping",
    "seed_world",
    "sku_for_offer",
]
