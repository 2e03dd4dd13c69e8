"""Quantity policy (issue 11 item 3): REPLACEMENT_QUANTITY_POLICY chooses between the old subscription's quantity
and the number of users holding the old license (never fewer than them), against the sandbox."""

from __future__ import annotations

import pytest

from d365_migration import ConfigurationError, Settings
from d365_tooling.sandbox import SandboxServer
from tests.steps._world import Tenant, detect, drive, mine, service


@pytest.mark.parametrize(("policy", "expected"), [("old_quantity", 7), ("license_holders", 3), (None, 7)],
                         ids=["old_quantity", "license_holders", "default"])
async def test_policy_chooses_the_quantity_bought(server: SandboxServer, storage: str, policy: str | None,
                                                  expected: int) -> None:
    t = Tenant(server.state, holders=3, others=2, quantity=7)
    overrides = {"REPLACEMENT_QUANTITY_POLICY": policy} if policy else {}
    async with service(server.url, storage, **overrides) as svc:
        await drive(svc, (await detect(svc)).purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    (purchase,) = mine(server.state, t)
    assert purchase["quantity"] == expected and record.quantity == expected
    started = next(h for h in record.history if h["event"] == "purchase_started")
    assert f"x{expected}" in started["detail"] and (policy or "old_quantity") in started["detail"]
    # every holder was moved: license_holders never buys fewer seats than the users who need one
    assert record.users_moved == 3 and all(t.old_sku not in t.licenses(u) for u in t.holders)


def test_unknown_policy_is_a_clear_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"REPLACEMENT_QUANTITY_POLICY": "cheapest"})
    assert "REPLACEMENT_QUANTITY_POLICY" in str(err.value) and "license_holders" in str(err.value)
    assert Settings.from_env({"REPLACEMENT_QUANTITY_POLICY": "License-Holders"}).replacement_quantity_policy == (
        "license_holders")
