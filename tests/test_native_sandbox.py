"""The sandbox's native migration resources (transition eligibilities, transitions, upgrades) and their switches.

Shapes and codes: Microsoft Learn partner-center/developer/transition-a-new-commerce-subscription, get-transitions,
transition-resources, transition-a-subscription, upgrade-resources (see d365_tooling/sandbox/_transitions.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from d365_migration import ClientError, PartnerCenterClient, RequestAttempt
from d365_tooling.sandbox import SandboxServer
from d365_tooling.sandbox._transitions import native_operations


def _first(sandbox: SandboxServer) -> Any:
    return sandbox.manifest.expected[0]


def _url(sandbox: SandboxServer, m: Any, tail: str) -> str:
    return f"{sandbox.url}/v1/customers/{m.customer_id}/subscriptions/{m.subscription_id}/{tail}"


def _holders(sandbox: SandboxServer, m: Any, sku: str) -> set[str]:
    return {u["id"] for u in sandbox.state.users(m.customer_id)
            if sku.lower() in sandbox.state.user_licenses(m.customer_id, u["id"])}


def test_eligibility_needs_its_type(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    r = httpx.get(_url(sandbox, m, "transitionEligibilities"))
    assert r.status_code == 400


def test_no_native_path_by_default_with_documented_errors(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    body = httpx.get(_url(sandbox, m, "transitionEligibilities"), params={"eligibilityType": "immediate"}).json()
    detail = body["items"][0]["eligibilities"][0]
    assert body["items"][0]["catalogItemId"] == m.replacement_catalog_item_id
    assert detail["isEligible"] is False and detail["errors"][0]["code"] == 7
    upgrades = httpx.get(_url(sandbox, m, "upgrades")).json()["items"]
    assert upgrades[0]["isEligible"] is False
    assert upgrades[0]["upgradeErrors"][0]["code"] == "subscription_does_not_have_any_upgrade_paths"
    post = httpx.post(_url(sandbox, m, "transitions"), json={
        "toCatalogItemId": m.replacement_catalog_item_id, "quantity": m.quantity,
        "transitionType": "transition_with_license_transfer"})
    assert post.status_code == 400
    assert sandbox.state.subscription(m.customer_id, m.subscription_id)["status"] == "active"
    assert native_operations(sandbox.state) == []


def test_transition_with_license_transfer_moves_every_holder(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    sandbox.config.native_paths = {m.customer_id: "transition_with_license_transfer"}
    detail = httpx.get(_url(sandbox, m, "transitionEligibilities"),
                       params={"eligibilityType": "immediate"}).json()["items"][0]["eligibilities"][0]
    assert detail == {"isEligible": True, "transitionType": "transition_with_license_transfer", "errors": []}
    before = _holders(sandbox, m, m.old_sku_id)
    post = httpx.post(_url(sandbox, m, "transitions"), json={
        "toCatalogItemId": m.replacement_catalog_item_id, "quantity": m.quantity,
        "transitionType": "transition_with_license_transfer"})
    assert post.status_code == 200, post.text
    new_id = post.json()["toSubscriptionId"]
    new_sku = sandbox.state.subscription(m.customer_id, new_id)
    assert new_sku["status"] == "active"
    assert sandbox.state.subscription(m.customer_id, m.subscription_id)["status"] == "suspended"
    assert before and _holders(sandbox, m, m.old_sku_id) == set()
    history = httpx.get(_url(sandbox, m, "transitions")).json()["items"]
    assert [e["status"] for e in history[0]["events"]] == ["Completed", "Completed"]
    again = httpx.post(_url(sandbox, m, "transitions"), json={
        "toCatalogItemId": m.replacement_catalog_item_id, "quantity": m.quantity,
        "transitionType": "transition_with_license_transfer"})
    assert again.status_code == 400 and len(native_operations(sandbox.state)) == 1


def test_transition_only_offered_is_not_with_license_transfer(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    sandbox.config.native_paths = {m.customer_id: "transition_only"}
    detail = httpx.get(_url(sandbox, m, "transitionEligibilities"),
                       params={"eligibilityType": "immediate"}).json()["items"][0]["eligibilities"][0]
    assert detail["isEligible"] is True and detail["transitionType"] == "transition_only"
    post = httpx.post(_url(sandbox, m, "transitions"), json={
        "toCatalogItemId": m.replacement_catalog_item_id, "quantity": m.quantity,
        "transitionType": "transition_with_license_transfer"})
    assert post.status_code == 400


def test_slow_transition_shows_in_progress_then_completes(sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(native_completion_s=0.3)
    m = _first(sandbox)
    sandbox.config.native_paths = {m.customer_id: "transition_with_license_transfer"}
    post = httpx.post(_url(sandbox, m, "transitions"), json={
        "toCatalogItemId": m.replacement_catalog_item_id, "quantity": m.quantity,
        "transitionType": "transition_with_license_transfer"}).json()
    assert post["status"] == "Pending" and {e["status"] for e in post["events"]} == {"InProgress"}
    assert sandbox.state.subscription(m.customer_id, m.subscription_id)["status"] == "active"
    time.sleep(0.4)
    history = httpx.get(_url(sandbox, m, "transitions")).json()["items"]
    assert history[0]["status"] == "Complete"
    assert sandbox.state.subscription(m.customer_id, m.subscription_id)["status"] == "suspended"


def test_upgrade_with_license_transfer_reports_failing_users(sandbox: SandboxServer) -> None:
    m = next(e for e in sandbox.manifest.expected if len(e.user_ids) >= 2)
    failing = m.user_ids[0]
    sandbox.config.native_paths = {m.customer_id: "upgrade_with_license_transfer"}
    sandbox.config.native_license_error_users = [failing]
    upgrade = httpx.get(_url(sandbox, m, "upgrades")).json()["items"][0]
    assert upgrade["isEligible"] is True and upgrade["upgradeType"] == "upgrade_with_license_transfer"
    result = httpx.post(_url(sandbox, m, "upgrades"), json=upgrade).json()
    assert [e["userObjectId"] for e in result["licenseErrors"]] == [failing]
    assert result["targetSubscriptionId"]
    assert _holders(sandbox, m, m.old_sku_id) == {failing}
    # A user would be left without the product: the old subscription stays active.
    assert sandbox.state.subscription(m.customer_id, m.subscription_id)["status"] == "active"


@pytest.mark.parametrize("left_active", [True, False])
def test_source_left_active_switch(sandbox: SandboxServer, left_active: bool) -> None:
    m = _first(sandbox)
    sandbox.config.native_paths = {m.customer_id: "upgrade_with_license_transfer"}
    sandbox.config.native_source_left_active = left_active
    upgrade = httpx.get(_url(sandbox, m, "upgrades")).json()["items"][0]
    assert httpx.post(_url(sandbox, m, "upgrades"), json=upgrade).json()["upgradeErrors"] == []
    status = sandbox.state.subscription(m.customer_id, m.subscription_id)["status"]
    assert status == ("active" if left_active else "suspended")


# ---------------------------------------------------------------------- the client's typed calls


def _client(sandbox: SandboxServer) -> PartnerCenterClient:
    return PartnerCenterClient(sandbox.url, None, requests_per_minute=None, license_requests_per_minute=None,
                               max_attempts=2, backoff_base=0.0)


async def test_client_reads_eligibility_errors_verbatim(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    async with _client(sandbox) as client:
        options = await client.get_transition_options(m.customer_id, m.subscription_id)
        upgrades = await client.get_upgrade_options(m.customer_id, m.subscription_id)
    assert [o.is_eligible for o in options] == [False]
    assert options[0].errors[0].code == "7" and "transition paths" in options[0].errors[0].description
    assert upgrades[0].errors[0].code == "subscription_does_not_have_any_upgrade_paths"


async def test_client_transition_and_history(sandbox: SandboxServer) -> None:
    m = _first(sandbox)
    sandbox.config.native_paths = {m.customer_id: "transition_with_license_transfer"}
    async with _client(sandbox) as client:
        option = (await client.get_transition_options(m.customer_id, m.subscription_id))[0]
        assert option.is_eligible and option.with_license_transfer
        done = await client.create_transition(m.customer_id, m.subscription_id,
                                              to_catalog_item_id=option.catalog_item_id, quantity=m.quantity,
                                              transition_type=option.transition_type,
                                              request_id=RequestAttempt.first("transition", m.subscription_id))
        history = await client.list_transitions(m.customer_id, m.subscription_id)
        with pytest.raises(ClientError) as refused:
            await client.create_transition(m.customer_id, m.subscription_id,
                                           to_catalog_item_id=option.catalog_item_id, quantity=m.quantity,
                                           transition_type=option.transition_type,
                                           request_id=RequestAttempt.first("transition", m.subscription_id).next())
    assert done.completed and history[0].to_subscription_id == done.to_subscription_id
    assert refused.value.status == 400


async def test_client_upgrade_reports_license_errors(sandbox: SandboxServer) -> None:
    m = next(e for e in sandbox.manifest.expected if len(e.user_ids) >= 2)
    sandbox.config.native_paths = {m.customer_id: "upgrade_with_license_transfer"}
    sandbox.config.native_license_error_users = [m.user_ids[1]]
    async with _client(sandbox) as client:
        option = (await client.get_upgrade_options(m.customer_id, m.subscription_id))[0]
        result = await client.create_upgrade(m.customer_id, m.subscription_id, option,
                                             request_id=RequestAttempt.first("upgrade", m.subscription_id))
    assert option.with_license_transfer and result.errors == ()
    assert [e.user_id for e in result.license_errors] == [m.user_ids[1]]
