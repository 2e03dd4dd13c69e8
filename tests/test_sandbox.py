"""Real HTTP tests of the Partner Center sandbox (httpx against a running uvicorn server)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

import httpx
import pytest

from d365_tooling.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    QO_DISTRACTOR_KINDS,
    RETIRED_OFFERS,
    SandboxConfig,
    SandboxServer,
    SandboxState,
    make_token,
    seed_world,
    sku_for_offer,
)

TODAY = date(2026, 11, 25)


def client(srv: SandboxServer, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=10, **kw)


def ids() -> dict[str, str]:
    return {"MS-RequestId": str(uuid.uuid4()), "MS-CorrelationId": str(uuid.uuid4())}


def follow_links(c: httpx.Client, first: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    r = c.get(first)
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["totalCount"] == len(body["items"])
        items += body["items"]
        nxt = body["links"].get("next")
        if not nxt:
            assert "continuationToken" not in body
            return items
        uri = nxt["uri"] if nxt["uri"].startswith("/v1") else "/v1" + nxt["uri"]
        r = c.request(nxt["method"], uri, headers={h["key"]: h["value"] for h in nxt["headers"]})


def maybe_lost(call: Callable[[], httpx.Response]) -> httpx.Response | None:
    """The response, or None when the server dropped the connection."""
    try:
        return call()
    except httpx.TransportError:
        return None


# ----------------------------------------------------------------------------------------------- paging & shapes
def test_paging_via_links_next_returns_every_customer_once(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=23)
    with client(srv) as c:
        items = follow_links(c, "/v1/customers?size=5")
    got = [i["id"] for i in items]
    assert len(got) == 23 and sorted(got) == sorted(srv.state.customer_ids())
    assert all(i["attributes"]["objectType"] == "Customer" for i in items)


def test_paging_via_continuation_token(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=23)
    got: list[str] = []
    pages = 0
    with client(srv) as c:
        body = c.get("/v1/customers", params={"size": 4}).json()
        while True:
            pages += 1
            got += [i["id"] for i in body["items"]]
            token = body.get("continuationToken")
            if not token:
                break
            r = c.get("/v1/customers?size=4&seekoperation=next", headers={"MS-ContinuationToken": token})
            body = r.json()
    assert pages == 6
    assert sorted(got) == sorted(srv.state.customer_ids()) and len(got) == len(set(got))


def test_garbled_continuation_token_is_400(sandbox: SandboxServer) -> None:
    with client(sandbox) as c:
        r = c.get("/v1/customers?size=2&seekOperation=Next", headers={"MS-ContinuationToken": "bm9wZQ=="})
        assert r.status_code == 400
        assert r.json()["source"] == "PartnerFD" and isinstance(r.json()["code"], int)
        r = c.get("/v1/customers?size=2&seekOperation=Next")
        assert r.status_code == 400


def test_customer_shape_headers_and_errors(sandbox: SandboxServer) -> None:
    with client(sandbox) as c:
        h = ids()
        r = c.get("/v1/customers?size=2", headers=h)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.headers["ms-requestid"] == h["MS-RequestId"] and r.headers["ms-correlationid"] == h["MS-CorrelationId"]
        assert r.headers["ms-cv"] and r.headers["ms-serverid"]
        body = r.json()
        assert body["attributes"] == {"objectType": "Collection"} and body["totalCount"] == 2
        cust = body["items"][0]
        assert cust["relationshipToPartner"] == "reseller"
        assert cust["companyProfile"]["tenantId"] == cust["id"]
        assert cust["companyProfile"]["attributes"]["objectType"] == "CustomerCompanyProfile"
        assert cust["links"]["self"]["uri"] == f"/customers/{cust['id']}"
        assert c.get(f"/v1/customers/{cust['id'].upper()}").json()["id"] == cust["id"]
        r = c.get(f"/v1/customers/{uuid.uuid4()}/subscriptions")
        assert r.status_code == 404 and r.json()["code"] in (1000, 20003)
        r = c.get(f"/v1/customers/{cust['id']}/subscriptions/{uuid.uuid4()}")
        assert r.status_code == 404 and r.json()["code"] == 20003
        r = c.get("/v1/no/such/route")
        assert r.status_code == 404 and r.json()["source"] == "PartnerFD"


def test_users_paging(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=4)
    cid = srv.state.customer_ids()[0]
    for n in range(12):
        srv.state.add_user(cid, str(uuid.uuid4()), f"extra{n}@x.test", "Ex", f"Tra{n}", "US")
    with client(srv) as c:
        items = follow_links(c, f"/v1/customers/{cid}/users?size=5")
    assert len(items) == len(srv.state.users(cid)) and len({u["id"] for u in items}) == len(items)
    assert all(u["attributes"]["objectType"] == "CustomerUser" and u["state"] == "active" for u in items)


# ----------------------------------------------------------------------------------------------- subscriptions
def test_subscription_fields_legacy_and_nce(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    with client(sandbox) as c:
        items = c.get(f"/v1/customers/{exp.customer_id}/subscriptions").json()["items"]
        by_id = {s["id"].lower(): s for s in items}
        s = by_id[exp.subscription_id.lower()]
        assert s["billingType"] == "license" and s["unitType"] == "Licenses" and s["autoRenewEnabled"] is False
        assert s["status"] == "active" and s["quantity"] == exp.quantity and s["attributes"]["etag"]
        uuid.UUID(s["offerId"])
        one = c.get(f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id.swapcase()}").json()
        assert one["id"] == s["id"]
        nce = [x for x in items if ":" in x["offerId"]]
        for x in nce:
            assert x["productType"] == {"id": "OnlineServicesNCE", "displayName": "OnlineServicesNCE"}
            assert x["termDuration"]


def _etag_patch(c: httpx.Client, cid: str, sid: str, change: dict[str, Any], *, pascal: bool = False,
                quote: bool = True) -> httpx.Response:
    sub = c.get(f"/v1/customers/{cid}/subscriptions/{sid}").json()
    sub.update(change)
    if pascal:
        sub = {k[0].upper() + k[1:]: v for k, v in sub.items()}
    etag = sub.get("attributes", sub.get("Attributes"))["etag"]
    return c.patch(f"/v1/customers/{cid}/subscriptions/{sid}", json=sub,
                   headers={"If-Match": f'"{etag}"' if quote else etag})


def test_suspend_with_pascal_case_body_then_800091_then_reactivate(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    cid, sid = exp.customer_id, exp.subscription_id
    with client(sandbox) as c:
        r = _etag_patch(c, cid, sid, {"status": "suspended"}, pascal=True)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "suspended" and "Status" not in r.json()
        assert sandbox.state.subscription(cid, sid)["status"] == "suspended"
        r = _etag_patch(c, cid, sid, {"friendlyName": "renamed"})
        assert r.status_code == 400 and r.json()["code"] == 800091
        r = _etag_patch(c, cid, sid, {"status": "active"}, quote=False)
        assert r.status_code == 200 and r.json()["status"] == "active"
    assert [p["after_status"] for p in sandbox.state.patches()] == ["suspended", "active"]


def test_etag_mismatch_and_etag_changes_on_patch(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[1]  # type: ignore[union-attr]
    url = f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id}"
    with client(sandbox) as c:
        old = c.get(url).json()
        r = c.patch(url, json={**old, "friendlyName": "x"}, headers={"If-Match": f'"{old["attributes"]["etag"]}"'})
        assert r.status_code == 200
        assert r.json()["attributes"]["etag"] != old["attributes"]["etag"]
        r = c.patch(url, json={**old, "status": "suspended"}, headers={"If-Match": f'"{old["attributes"]["etag"]}"'})
        assert r.status_code in (400, 412)
        if r.status_code == 400:
            assert r.json()["code"] == 2055
    assert sandbox.state.subscription(exp.customer_id, exp.subscription_id)["status"] == "active"


def test_patch_without_auto_renew_turns_it_off(sandbox: SandboxServer) -> None:
    cid = sandbox.state.customer_ids()[0]
    sub = sandbox.state.purchase_by_hand(cid, DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], 3, "nce")
    assert sub["autoRenewEnabled"] is True
    with client(sandbox) as c:
        r = c.patch(f"/v1/customers/{cid}/subscriptions/{sub['id']}", json={"FriendlyName": "renamed"})
        assert r.status_code == 200
        assert r.json()["autoRenewEnabled"] is False and r.json()["friendlyName"] == "renamed"
        r = c.patch(f"/v1/customers/{cid}/subscriptions/{sub['id']}", json={"AutoRenewEnabled": True})
        assert r.json()["autoRenewEnabled"] is True


# ----------------------------------------------------------------------------------------------- purchasing
def test_cart_checkout_delayed_provisioning_and_list_lag(sandbox_factory: Any) -> None:
    srv = sandbox_factory(provisioning_delay_s=0.6, list_lag_s=0.6)
    cid = srv.state.customer_ids()[0]
    catalog_id = DEMO_REPLACEMENT_OFFERS["customer_engagement"]["faculty"]
    with client(srv) as c:
        r = c.post(f"/v1/customers/{cid}/carts", json={"LineItems": [{
            "Id": 0, "CatalogItemId": catalog_id, "Quantity": 7, "BillingCycle": "monthly", "TermDuration": "P1Y",
            "FriendlyName": "CE replacement"}]})
        assert r.status_code == 201, r.text
        cart = r.json()
        assert cart["status"] == "Active" and cart["attributes"]["objectType"] == "Cart"
        assert cart["lineItems"][0]["orderGroup"] == "0" and cart["lineItems"][0]["catalogItemId"] == catalog_id
        created = datetime.fromisoformat(cart["creationTimestamp"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(cart["expirationTimestamp"].replace("Z", "+00:00"))
        assert timedelta(days=6, hours=23) < expires - created <= timedelta(days=7)
        r = c.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout")
        assert r.status_code == 201, r.text
        result = r.json()
        assert result["attributes"]["objectType"] == "CartCheckoutResult" and result["orderErrors"] == []
        order = result["orders"][0]
        assert re.fullmatch(r"[0-9a-f]{12}", order["id"]) and order["status"] == "pending"
        assert "subscriptionId" not in order["lineItems"][0]
        assert c.get(f"/v1/customers/{cid}/carts/{cart['id']}").json()["status"] == "Ordered"
        assert c.get(f"/v1/customers/{cid}/subscriptions?order_id={order['id']}").json()["items"] == []
        time.sleep(0.7)
        got = c.get(f"/v1/customers/{cid}/orders/{order['id']}").json()
        assert got["status"] == "completed"
        li = got["lineItems"][0]
        sid = li["subscriptionId"]
        assert li["links"]["subscription"]["uri"].endswith(sid)
        sub = c.get(f"/v1/customers/{cid}/subscriptions/{sid}").json()
        assert sub["friendlyName"] == "CE replacement" and sub["quantity"] == 7 and sub["orderId"] == order["id"]
        assert sub["offerId"] == catalog_id and sub["status"] == "active"
        # listed only after the list lag
        assert sid not in [s["id"] for s in c.get(f"/v1/customers/{cid}/subscriptions").json()["items"]]
        ps = c.get(f"/v1/customers/{cid}/subscriptions/{sid}/provisioningstatus").json()
        assert ps["status"] == "pending"
        time.sleep(0.7)
        assert sid in [s["id"] for s in c.get(f"/v1/customers/{cid}/subscriptions").json()["items"]]
        listed = c.get(f"/v1/customers/{cid}/subscriptions?order_id={order['id']}").json()["items"]
        assert [s["id"] for s in listed] == [sid]
        ps = c.get(f"/v1/customers/{cid}/subscriptions/{sid}/provisioningstatus").json()
        assert ps["status"] == "success" and ps["attributes"]["objectType"] == "SubscriptionProvisioningStatus"
        assert ps["skuId"] == sku_for_offer(catalog_id).id  # type: ignore[union-attr]
    purchases = srv.state.purchases()
    assert len(purchases) == 1 and purchases[0]["subscription_ids"] == [sid] and purchases[0]["quantity"] == 7


def test_checkout_replay_buys_nothing_twice(sandbox: SandboxServer) -> None:
    cid = sandbox.state.customer_ids()[1]
    with client(sandbox) as c:
        cart = c.post(f"/v1/customers/{cid}/carts", json={"lineItems": [{
            "id": 0, "catalogItemId": DEMO_REPLACEMENT_OFFERS["sales"]["students"], "quantity": 2,
            "billingCycle": "monthly", "termDuration": "P1Y"}]}).json()
        first = c.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout")
        second = c.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout")
        assert first.status_code == second.status_code == 201
        assert first.json()["orders"][0]["id"] == second.json()["orders"][0]["id"]
        r = c.put(f"/v1/customers/{cid}/carts/{cart['id']}", json=cart)
        assert r.status_code == 400
    assert len(sandbox.state.purchases()) == 1


def test_concurrent_checkout_gets_409(sandbox_factory: Any) -> None:
    srv = sandbox_factory(checkout_duration_s=0.5)
    cid = srv.state.customer_ids()[0]
    with client(srv) as c:
        cart = c.post(f"/v1/customers/{cid}/carts", json={"lineItems": [{
            "id": 0, "catalogItemId": DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], "quantity": 1,
            "billingCycle": "monthly"}]}).json()
    results: list[httpx.Response] = []

    def go() -> None:
        with client(srv) as c2:
            results.append(c2.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout"))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 409]
    assert next(r for r in results if r.status_code == 409).json()["code"] == 800064
    assert len(srv.state.purchases()) == 1


def test_cart_unknown_catalog_item_is_400(sandbox: SandboxServer) -> None:
    cid = sandbox.state.customer_ids()[0]
    with client(sandbox) as c:
        r = c.post(f"/v1/customers/{cid}/carts", json={"lineItems": [{
            "id": 0, "catalogItemId": "CFQ7TTC0NOPE:0001:CFQ7TTC0NOPE", "quantity": 1, "billingCycle": "monthly"}]})
        assert r.status_code == 400 and r.json()["source"] == "PartnerFD"


def test_legacy_order_path(sandbox_factory: Any) -> None:
    srv = sandbox_factory(provisioning_delay_s=0.3)
    cid = srv.state.customer_ids()[2]
    offer = LEGACY_REPLACEMENT_OFFERS["sales"]["government"]
    with client(srv) as c:
        bad = c.post(f"/v1/customers/{cid}/orders", json={"lineItems": [
            {"lineItemNumber": 1, "offerId": offer, "quantity": 1}]})
        assert bad.status_code == 400 and bad.json()["code"] == 800071
        bad = c.post(f"/v1/customers/{cid}/orders", json={"lineItems": [
            {"lineItemNumber": 0, "offerId": str(uuid.uuid4()), "quantity": 1}]})
        assert bad.status_code == 400 and bad.json()["code"] == 800004
        retired = c.post(f"/v1/customers/{cid}/orders", json={"lineItems": [
            {"lineItemNumber": 0, "offerId": RETIRED_OFFERS[0].id, "quantity": 1}]})
        assert retired.status_code == 403
        r = c.post(f"/v1/customers/{cid}/orders", json={"LineItems": [
            {"LineItemNumber": 0, "OfferId": offer.lower(), "Quantity": 4, "FriendlyName": "gov sales"}],
            "BillingCycle": "monthly"})
        assert r.status_code == 201, r.text
        order = r.json()
        uuid.UUID(order["id"])
        assert order["status"] == "pending" and order["attributes"]["objectType"] == "Order"
        assert order["referenceCustomerId"] == cid and order["links"]["provisioningStatus"]["uri"]
        time.sleep(0.4)
        got = c.get(f"/v1/customers/{cid}/orders/{order['id'].upper()}").json()
        assert got["status"] == "completed"
        sid = got["lineItems"][0]["subscriptionId"]
        sub = c.get(f"/v1/customers/{cid}/subscriptions/{sid}").json()
        assert sub["friendlyName"] == "gov sales" and sub["quantity"] == 4 and "productType" not in sub
        orders = c.get(f"/v1/customers/{cid}/orders").json()
        assert orders["totalCount"] == 1 and orders["items"][0]["id"] == order["id"]
    assert srv.state.purchases()[0]["offer_id"].lower() == offer.lower()


# ----------------------------------------------------------------------------------------------- licenses
def _sku_entry(c: httpx.Client, cid: str, sku_id: str) -> dict[str, Any] | None:
    for item in c.get(f"/v1/customers/{cid}/subscribedskus").json()["items"]:
        if item["productSku"]["id"].lower() == sku_id.lower():
            return item
    return None


def test_provisioningstatus_sku_matches_subscribedskus(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[2]  # type: ignore[union-attr]
    with client(sandbox) as c:
        ps = c.get(f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id}/provisioningstatus").json()
        assert ps["skuId"].lower() == exp.old_sku_id.lower() and ps["status"] == "success"
        assert ps["quantity"] == exp.quantity
        assert _sku_entry(c, exp.customer_id, ps["skuId"]) is not None


def test_subscribedskus_arithmetic(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    cid = exp.customer_id
    with client(sandbox) as c:
        e = _sku_entry(c, cid, exp.old_sku_id)
        assert e is not None
        assert e["activeUnits"] == e["totalUnits"] == exp.quantity
        assert e["consumedUnits"] == len(exp.user_ids)
        assert e["availableUnits"] == exp.quantity - len(exp.user_ids)
        assert e["suspendedUnits"] == 0 and e["attributes"]["objectType"] == "SubscribedSku"
        _etag_patch(c, cid, exp.subscription_id, {"status": "suspended"})
        e = _sku_entry(c, cid, exp.old_sku_id)
        assert e is not None
        assert e["activeUnits"] == 0 and e["suspendedUnits"] == exp.quantity and e["totalUnits"] == 0
        assert e["consumedUnits"] == len(exp.user_ids) and e["availableUnits"] == 0


def test_licenseupdates_atomic_swap_and_60012(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    cid = exp.customer_id
    new = DEMO_REPLACEMENT_OFFERS[exp.family][exp.audience]
    new_sku = sku_for_offer(new).id  # type: ignore[union-attr]
    no_location = set(sandbox.manifest.users_without_usage_location)  # type: ignore[union-attr]
    holders = [u for u in exp.user_ids if (cid, u) not in no_location]
    assert len(holders) >= 1
    # exactly one unit too few: buy one per holder, then someone else takes one unit
    sandbox.state.purchase_by_hand(cid, new, len(holders), "short")
    sandbox.state.add_user(cid, str(uuid.uuid4()), "taker@x.test", "T", "K", "US", [new_sku])
    with client(sandbox) as c:
        for uid in holders[:-1]:
            r = c.post(f"/v1/customers/{cid}/users/{uid}/licenseupdates", json={
                "LicensesToAssign": [{"SkuId": new_sku, "ExcludedPlans": None}],
                "LicensesToRemove": [exp.old_sku_id], "Attributes": {"ObjectType": "LicenseUpdate"}})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["licensesToAssign"][0]["skuId"] == new_sku and body["licenseWarnings"] == []
            assert body["attributes"]["objectType"] == "LicenseUpdate"
            assert sandbox.state.user_licenses(cid, uid).count(new_sku.lower()) == 1
            assert exp.old_sku_id.lower() not in sandbox.state.user_licenses(cid, uid)
        last = holders[-1]
        before = sandbox.state.user_licenses(cid, last)
        r = c.post(f"/v1/customers/{cid}/users/{last}/licenseupdates", json={
            "licensesToAssign": [{"skuId": new_sku}], "licensesToRemove": [exp.old_sku_id]})
        assert r.status_code == 400 and r.json()["code"] == 60012
        assert r.json()["data"][0].startswith("LicenseQuotaExceededException")
        assert sandbox.state.user_licenses(cid, last) == before  # atomic: the old SKU was NOT removed
        # assigning what the user already has is a no-op success; removing what they lack is a no-op
        if holders[:-1]:
            uid = holders[0]
            r = c.post(f"/v1/customers/{cid}/users/{uid}/licenseupdates", json={
                "licensesToAssign": [{"skuId": new_sku.upper()}], "licensesToRemove": [str(uuid.uuid4())]})
            assert r.status_code == 201
            assert sandbox.state.user_licenses(cid, uid).count(new_sku.lower()) == 1
        r = c.post(f"/v1/customers/{cid}/users/{uuid.uuid4()}/licenseupdates", json={"licensesToRemove": []})
        assert r.status_code == 404 and r.json()["code"] == 60002


def test_user_without_usage_location_cannot_get_new_license(sandbox: SandboxServer) -> None:
    assert sandbox.manifest is not None
    cid, uid = sandbox.manifest.users_without_usage_location[0]
    new_sku = sku_for_offer(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]).id  # type: ignore[union-attr]
    sandbox.state.purchase_by_hand(cid, DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], 5)
    with client(sandbox) as c:
        user = c.get(f"/v1/customers/{cid}/users/{uid}").json()
        assert user["usageLocation"] is None
        r = c.post(f"/v1/customers/{cid}/users/{uid}/licenseupdates", json={"licensesToAssign": [{"skuId": new_sku}]})
        assert r.status_code == 400 and "usage location" in r.json()["description"].lower()
        lic = c.get(f"/v1/customers/{cid}/users/{uid}/licenses").json()
        assert lic["attributes"]["objectType"] == "Collection"
        assert all(x["attributes"]["objectType"] == "License" for x in lic["items"])
        assert new_sku not in [x["productSku"]["id"] for x in lic["items"]]


def _license_world() -> tuple[SandboxState, str, str, str, list[str]]:
    """One customer, a retired subscription of 3 whose SKU two users hold, and 3 units of its replacement."""
    state = SandboxState()
    cid = str(uuid.uuid4())
    state.add_customer(cid, "lic.onmicrosoft.com", "Licenses Inc")
    offer = RETIRED_OFFERS[0]
    sub = state.add_subscription(cid, offer=offer, quantity=3, commitment_end="2027-01-01T00:00:00Z")
    new = DEMO_REPLACEMENT_OFFERS[str(offer.family)][str(offer.audience)]
    state.purchase_by_hand(cid, new, 3)
    users = [str(uuid.uuid4()) for _ in range(2)]
    for n, uid in enumerate(users):
        state.add_user(cid, uid, f"u{n}@lic.test", "U", str(n), "US", [offer.sku.id])
    return state, cid, sub.id, sku_for_offer(new).id.lower(), users  # type: ignore[union-attr]


def _consumed(c: httpx.Client, cid: str, sku_id: str) -> int | None:
    entry = _sku_entry(c, cid, sku_id)
    return None if entry is None else int(entry["consumedUnits"])


def test_deleted_users_are_inactive_released_and_not_found_by_the_license_routes() -> None:
    state, cid, _, _, users = _license_world()
    old = RETIRED_OFFERS[0].sku.id
    with SandboxServer(state, SandboxConfig()) as srv, client(srv) as c:
        assert _consumed(c, cid, old) == 2
        state.delete_user(cid, users[0])
        assert [u["id"] for u in c.get(f"/v1/customers/{cid}/users").json()["items"]] == [users[1]]
        srv.config.deleted_users_listed = True
        listed = {u["id"]: u for u in c.get(f"/v1/customers/{cid}/users").json()["items"]}
        assert listed[users[0]]["state"] == "inactive" and "softDeletionTime" in listed[users[0]]
        assert listed[users[1]]["state"] == "active" and "softDeletionTime" not in listed[users[1]]
        r = c.get(f"/v1/customers/{cid}/users/{users[0]}/licenses")
        assert r.status_code == 404 and r.json()["code"] == 60002
        r = c.post(f"/v1/customers/{cid}/users/{users[0]}/licenseupdates", json={"licensesToRemove": [old]})
        assert r.status_code == 404 and r.json()["code"] == 60002
        assert _consumed(c, cid, old) == 1  # a deleted user's license is released
        # deleted right after the page that lists it: the licenses read that follows is a 404 60002
        srv.config.users_deleted_after_listing = [users[1]]
        assert users[1] in [u["id"] for u in c.get(f"/v1/customers/{cid}/users").json()["items"]]
        assert c.get(f"/v1/customers/{cid}/users/{users[1]}/licenses").json()["code"] == 60002


def test_consumed_units_lag_dropped_assignments_omitted_skus_and_if_match_rejected() -> None:
    state, cid, sid, new, users = _license_world()
    now = [time.time() + 1]
    state.clock = lambda: now[0]
    old = RETIRED_OFFERS[0].sku.id
    swap = {"licensesToAssign": [{"skuId": new}], "licensesToRemove": [old]}
    with SandboxServer(state, SandboxConfig(consumed_units_lag_s=60, license_assignments_dropped=1)) as srv, \
            client(srv) as c:
        assert c.post(f"/v1/customers/{cid}/users/{users[0]}/licenseupdates", json=swap).status_code == 201
        assert state.user_licenses(cid, users[0]) == []  # removed, but the assignment did not stick
        assert c.post(f"/v1/customers/{cid}/users/{users[1]}/licenseupdates", json=swap).status_code == 201
        assert state.user_licenses(cid, users[1]) == [new]
        assert (_consumed(c, cid, old), _consumed(c, cid, new)) == (2, 0)  # subscribedskus not caught up yet
        now[0] += 61
        assert (_consumed(c, cid, old), _consumed(c, cid, new)) == (0, 1)
        srv.config.subscribed_skus_omitted = [old.lower()]
        assert _sku_entry(c, cid, old) is None and _sku_entry(c, cid, new) is not None
        srv.config.if_match_always_rejected = True
        r = _etag_patch(c, cid, sid, {"status": "suspended"})
        assert r.status_code == 412 and r.json()["code"] == 2055
        assert state.subscription(cid, sid)["status"] == "active"


# ----------------------------------------------------------------------------------------------- auth, throttling
def test_auth_app_only_vs_app_user(sandbox_factory: Any) -> None:
    srv = sandbox_factory(require_auth=True)
    exp = srv.manifest.expected[0]
    cid, uid = exp.customer_id, exp.user_ids[-1]
    app = {"Authorization": f"Bearer {make_token(app_only=True)}"}
    user = {"Authorization": f"Bearer {make_token()}"}
    with client(srv) as c:
        assert c.get("/v1/customers").status_code == 401
        assert c.get("/v1/customers", headers=app).status_code == 200
        assert c.get(f"/v1/customers/{cid}/subscriptions", headers=app).status_code == 200
        r = c.post(f"/v1/customers/{cid}/users/{uid}/licenseupdates", headers=app, json={"licensesToRemove": []})
        assert r.status_code == 400 and r.json()["code"] == 900316
        r = c.get(f"/v1/customers/{cid}/users", headers=app)
        assert r.status_code == 403 and r.json()["code"] == 900329
        r = c.get(f"/v1/customers/{cid}/subscribedskus", headers=app)
        assert r.status_code == 403 and r.json()["code"] == 900329
        r = c.get(f"/v1/customers/{cid}/subscriptions/{exp.subscription_id}/provisioningstatus", headers=app)
        assert r.status_code == 403
        assert c.get(f"/v1/customers/{cid}/users", headers=user).status_code == 200
        r = c.post(f"/v1/customers/{cid}/users/{uid}/licenseupdates", headers=user, json={"licensesToRemove": []})
        assert r.status_code == 201


def test_throttling_429_with_retry_after(sandbox_factory: Any) -> None:
    srv = sandbox_factory(requests_per_minute=3, license_requests_per_minute=2)
    cid = srv.state.customer_ids()[0]
    with client(srv) as c:
        codes = [c.get(f"/v1/customers/{cid}/subscriptions").status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = c.get(f"/v1/customers/{cid}")
        assert r.status_code == 429
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 60
        assert r.json() == {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {retry} seconds."}
        # the license budget is separate
        assert c.get(f"/v1/customers/{cid}/users").status_code == 200
        assert c.get(f"/v1/customers/{cid}/subscribedskus").status_code == 200
        assert c.get(f"/v1/customers/{cid}/subscribedskus").status_code == 429


# ----------------------------------------------------------------------------------------------- faults
def test_lose_response_applies_the_write(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    sandbox.config.faults.lose_response_rate = 1.0
    with client(sandbox) as c:
        sub = c.get(f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id}").json()
        sub["status"] = "suspended"
        r = maybe_lost(lambda: c.patch(f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id}",
                                       json=sub))
        assert r is None or r.status_code == 500
    assert sandbox.state.subscription(exp.customer_id, exp.subscription_id)["status"] == "suspended"
    assert sandbox.state.requests()[-1]["fault"].startswith("lost-response")


def test_lose_first_write_response_then_retry_sees_result(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    cid = exp.customer_id
    sandbox.config.faults.lose_first_write_response = True
    body = {"lineItems": [{"id": 0, "catalogItemId": DEMO_REPLACEMENT_OFFERS["sales"]["faculty"], "quantity": 1,
                           "billingCycle": "monthly"}]}
    with client(sandbox) as c:
        cart = maybe_lost(lambda: c.post(f"/v1/customers/{cid}/carts", json=body))
        assert cart is None or cart.status_code == 500, "the first write response should be lost"
        carts = sandbox.state.snapshot()["customers"]
        made = [ct for cu in carts if cu["id"] == cid for ct in cu["carts"]]
        assert len(made) == 1  # applied although the client got an error
        cart_id = made[0]["id"]
        first = maybe_lost(lambda: c.post(f"/v1/customers/{cid}/carts/{cart_id}/checkout"))
        assert first is None or first.status_code == 500
        second = c.post(f"/v1/customers/{cid}/carts/{cart_id}/checkout")
        assert second.status_code == 201
    assert len(sandbox.state.purchases()) == 1


def _status_sequence(srv: SandboxServer, n: int) -> list[int]:
    out = []
    with client(srv) as c:
        for _ in range(n):
            try:
                out.append(c.get("/v1/customers?size=1").status_code)
            except httpx.TransportError:
                out.append(0)
    return out


def test_error_faults_are_reproducible_and_precede_action(sandbox_factory: Any) -> None:
    cfg = {"faults": {"seed": 7, "error_rate": 0.4, "reset_rate": 0.1}}
    a = sandbox_factory(customers=4)
    b = sandbox_factory(customers=4)
    for srv in (a, b):
        httpx.post(f"{srv.url}/_sandbox/config", json=cfg).raise_for_status()
    sa, sb = _status_sequence(a, 30), _status_sequence(b, 30)
    assert sa == sb
    assert {0, 200} <= set(sa) and ({500, 503} & set(sa))
    a.config.faults.error_rate = 1.0
    a.config.faults.reset_rate = 0.0
    exp = a.manifest.expected[0]
    with client(a) as c:
        url = f"/v1/customers/{exp.customer_id}/subscriptions/{exp.subscription_id}"
        r = c.patch(url, json={"status": "suspended"})
        assert r.status_code in (500, 503) and r.json()["source"] == "PartnerFD"
    assert a.state.subscription(exp.customer_id, exp.subscription_id)["status"] == "active"


def test_timeout_fault_sleeps(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=2)
    srv.config.faults.timeout_rate = 1.0
    srv.config.faults.timeout_s = 0.5
    with client(srv) as c, pytest.raises(httpx.ReadTimeout):
        c.get("/v1/customers", timeout=0.2)


def test_dedupe_request_ids(sandbox_factory: Any) -> None:
    srv = sandbox_factory(dedupe_request_ids=True)
    cid = srv.state.customer_ids()[0]
    h = ids()
    body = {"lineItems": [{"lineItemNumber": 0, "offerId": LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"],
                           "quantity": 2}]}
    with client(srv) as c:
        first = c.post(f"/v1/customers/{cid}/orders", json=body, headers=h)
        again = c.post(f"/v1/customers/{cid}/orders", json=body, headers=h)
        other = c.post(f"/v1/customers/{cid}/orders", json=body, headers=ids())
    assert first.status_code == again.status_code == other.status_code == 201
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert len(srv.state.purchases()) == 2


def test_admin_routes(sandbox: SandboxServer) -> None:
    with client(sandbox) as c:
        h = ids()
        c.get("/v1/customers", headers=h)
        log = c.get("/_sandbox/requests").json()["items"]
        assert log[-1]["requestId"] == h["MS-RequestId"] and log[-1]["status"] == 200
        assert log[-1]["correlationId"] == h["MS-CorrelationId"] and log[-1]["method"] == "GET"
        snap = c.get("/_sandbox/state").json()
        assert len(snap["customers"]) == 8
        r = c.post("/_sandbox/config", json={"latency_ms": 1, "faults": {"seed": 3}})
        assert r.status_code == 200 and r.json()["latency_ms"] == 1 and sandbox.config.faults.seed == 3
        assert c.post("/_sandbox/config", json={"nope": 1}).status_code == 400
        cid = snap["customers"][0]["id"]
        sandbox.state.purchase_by_hand(cid, DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], 1)
        assert c.post("/_sandbox/reset").status_code == 200
        assert sandbox.state.purchases() == [] and len(sandbox.state.customer_ids()) == 8
        assert sandbox.state.customer_ids()[0] == cid  # same seed -> same world


def test_by_hand_mutations(sandbox: SandboxServer) -> None:
    exp = sandbox.manifest.expected[0]  # type: ignore[union-attr]
    st = sandbox.state
    st.set_subscription_status(exp.customer_id, exp.subscription_id, "suspended")
    assert st.subscription(exp.customer_id, exp.subscription_id)["status"] == "suspended"
    uid = exp.user_ids[0]
    st.remove_user_license(exp.customer_id, uid, exp.old_sku_id.upper())
    assert exp.old_sku_id.lower() not in st.user_licenses(exp.customer_id, uid)
    sub = st.purchase_by_hand(exp.customer_id, RETIRED_OFFERS[0].id, 3, "manual")
    assert sub["friendlyName"] == "manual" and st.purchases()[-1]["subscription_ids"] == [sub["id"]]


# ----------------------------------------------------------------------------------------------- seed
def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def test_seed_manifest_covers_every_offer_and_audience_and_is_deterministic() -> None:
    s1, s2, s3 = SandboxState(), SandboxState(), SandboxState()
    m1 = seed_world(s1, customers=20, seed=5, today=TODAY)
    m2 = seed_world(s2, customers=20, seed=5, today=TODAY)
    m3 = seed_world(s3, customers=20, seed=6, today=TODAY)
    assert m1.to_json() == m2.to_json() and m1.to_json() != m3.to_json()
    assert {e.offer_name for e in m1.expected} == {o.name for o in RETIRED_OFFERS}
    assert len(RETIRED_OFFERS) == 26
    assert {e.audience for e in m1.expected} == {"commercial", "faculty", "students", "government"}
    assert {"already_suspended", "auto_renew_enabled", "nce_subscription", "not_qualified_offer"} <= {
        d.reason for d in m1.distractors}
    assert set(QO_DISTRACTOR_KINDS) <= {d.reason for d in m1.distractors}
    assert m1.expected_subscription_ids().isdisjoint(m1.distractor_subscription_ids())
    assert m1.users_without_usage_location
    assert any(e.offer_name_as_listed != e.offer_name for e in m1.expected)  # name variations
    assert any(e.subscription_id.isupper() for e in m1.expected)
    for e in m1.expected:
        assert e.user_ids and e.quantity >= len(e.user_ids)
        for uid in e.user_ids:
            assert e.old_sku_id.lower() in s1.user_licenses(e.customer_id, uid)


def test_documented_filter_over_seeded_world_yields_exactly_the_manifest(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=30, seed=3, today=TODAY)
    retired = {_norm(o.name) for o in RETIRED_OFFERS}
    found: set[str] = set()
    with client(srv) as c:
        for cust in follow_links(c, "/v1/customers?size=7"):
            for s in c.get(f"/v1/customers/{cust['id']}/subscriptions").json()["items"]:
                end = date.fromisoformat(s["commitmentEndDate"][:10])
                if (s["status"] == "active" and s["autoRenewEnabled"] is False and _norm(s["offerName"]) in retired
                        and TODAY <= end <= TODAY + timedelta(days=60)):
                    found.add(s["id"].lower())
    assert found == srv.manifest.expected_subscription_ids()


def test_seed_ten_thousand_customers() -> None:
    # How long seeding takes is the bench's business (`make bench` seeds 10,000 customers), not a test's.
    state = SandboxState()
    m = seed_world(state, customers=10_000, seed=2, today=TODAY)
    assert len(state.customer_ids()) == 10_000 and len(m.expected) >= 6000
    assert {e.offer_name for e in m.expected} == {o.name for o in RETIRED_OFFERS}


def test_server_context_manager_and_sku_mapping() -> None:
    with SandboxServer(config=SandboxConfig()) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{srv.url}/v1/customers").json()["items"] == []
        cat = httpx.get(f"{srv.url}/_sandbox/catalog").json()
        assert len(cat["retiredOffers"]) == 26
    for fam, per_aud in DEMO_REPLACEMENT_OFFERS.items():
        assert set(per_aud) == {"commercial", "faculty", "students", "government"}
        for aud, cid in per_aud.items():
            assert re.fullmatch(r"CFQ7TTC0\w{4}:\d{4}:CFQ7TTC0\w{4}", cid)
            assert sku_for_offer(cid) == sku_for_offer(LEGACY_REPLACEMENT_OFFERS[fam][aud].lower())
    skus = {sku_for_offer(o.id).id for o in RETIRED_OFFERS}  # type: ignore[union-attr]
    assert len(skus) == 8


async def test_async_context_manager_and_cart_update() -> None:
    state = SandboxState()
    seed_world(state, customers=4, seed=9, today=TODAY)
    cid = state.customer_ids()[0]
    async with SandboxServer(state) as srv, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        cart = (await c.post(f"/v1/customers/{cid}/carts", json={"lineItems": [{
            "id": 0, "catalogItemId": DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], "quantity": 1,
            "billingCycle": "monthly"}]})).json()
        cart["lineItems"][0]["quantity"] = 3
        r = await c.put(f"/v1/customers/{cid}/carts/{cart['id']}", json=cart)
        assert r.status_code == 200 and r.json()["lineItems"][0]["quantity"] == 3
        result = (await c.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout")).json()
        oid = result["orders"][0]["id"]
        ps = (await c.get(f"/v1/customers/{cid}/orders/{oid}/provisioningstatus")).json()
        assert ps["items"][0]["status"] == "fulfilled"
    assert state.purchases()[0]["quantity"] == 3


# ----------------------------------------------------------------------------------------------- Learn's example shapes
def test_learn_example_shapes_switches(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=5, absolute_next_links=True, next_link_v1_prefix="/V1",
                          country_only_in_company_profile=True, checkout_answers_bare_order=True,
                          availabilities_bare_object=True, require_partner_attestation=True,
                          etag_literal_match=True)
    product, sku, _ = DEMO_REPLACEMENT_OFFERS["sales"]["commercial"].split(":")
    exp = srv.manifest.expected[0]
    cid, sid = exp.customer_id, exp.subscription_id
    with client(srv) as c:
        page = c.get("/v1/customers?size=2").json()
        assert page["links"]["next"]["uri"] == f"{srv.url}/V1/customers?size=2&seekOperation=Next"
        customer = page["items"][0]
        assert customer["companyProfile"]["address"]["country"] == "US"
        assert "defaultAddress" not in customer["billingProfile"]
        availability = c.get(f"/v1/products/{product}/skus/{sku}/availabilities?country=US").json()
        assert "items" not in availability and availability["catalogItemId"].startswith(f"{product}:{sku}:")
        line = {"id": 0, "catalogItemId": availability["catalogItemId"], "quantity": 1, "billingCycle": "monthly",
                "termDuration": "P1Y"}
        refused = c.post(f"/v1/customers/{cid}/carts", json={"lineItems": [line]}, headers=ids())
        assert refused.status_code == 400 and refused.json()["code"] == 800002
        assert "PartnerOnRecordAttestationAccepted" in refused.json()["description"]
        cart = c.post(f"/v1/customers/{cid}/carts", headers=ids(),
                      json={"PartnerOnRecordAttestationAccepted": True, "lineItems": [line]}).json()
        order = c.post(f"/v1/customers/{cid}/carts/{cart['id']}/checkout", headers=ids()).json()
        assert order["attributes"]["objectType"] == "Order" and "orders" not in order
        assert _etag_patch(c, cid, sid, {"status": "suspended"}).status_code == 412  # quoted: refused literally
        assert _etag_patch(c, cid, sid, {"status": "suspended"}, quote=False).status_code == 200


def test_availabilities_in_all_segments_honour_target_segment(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=1, availabilities_in_all_segments=True)
    product, sku, aid = DEMO_REPLACEMENT_OFFERS["sales"]["commercial"].split(":")
    base = f"/v1/products/{product}/skus/{sku}/availabilities"
    with client(srv) as c:
        listed = c.get(f"{base}?country=US").json()["items"]
        assert [a["segment"] for a in listed] == ["education", "commercial", "government"]
        assert listed[1]["id"] == aid and len({a["id"] for a in listed}) == 3
        only = c.get(f"{base}?country=US&targetSegment=nonprofit").json()["items"]
        assert [a["segment"] for a in only] == ["nonprofit"]
        assert c.get(f"{base}/{only[0]['id']}?country=US").json()["segment"] == "nonprofit"
        assert [a["segment"] for a in c.get(f"{base}?country=GB").json()["items"]] == ["education", "commercial"]
        education = listed[0]["catalogItemId"]
        cart = c.post(f"/v1/customers/{srv.state.customer_ids()[0]}/carts", headers=ids(), json={"lineItems": [
            {"id": 0, "catalogItemId": education, "quantity": 1, "billingCycle": "monthly", "termDuration": "P1Y"}]})
        assert cart.status_code == 201  # the sandbox sells it: choosing the segment is the client's job


def test_transition_switches_show_learns_shapes(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=3, transition_answer_without_target=True,
                          transition_history_as_learn_example=True)
    exp = srv.manifest.expected[0]
    cid, sid = exp.customer_id, exp.subscription_id
    srv.config.native_paths = {cid: "transition_with_license_transfer"}
    url = f"/v1/customers/{cid}/subscriptions/{sid}"
    with client(srv) as c:
        (target,) = c.get(f"{url}/transitionEligibilities?eligibilityType=immediate").json()["items"]
        answer = c.post(f"{url}/transitions", headers=ids(), json={
            "toCatalogItemId": target["catalogItemId"], "quantity": target["quantity"],
            "transitionType": "transition_with_license_transfer"}).json()
        assert "toSubscriptionId" not in answer and answer["fromSubscriptionId"] == sid
        history = c.get(f"{url}/transitions").json()
    assert "items" not in history
    (item,) = history["transition"]
    assert item["operationId"] == answer["id"] and "fromSubscriptionId" not in item and item["toSubscriptionId"]
    assert [(e["name"], e["status"]) for e in item["Events"]] == [
        ("Conversion", "Started "), ("Conversion", "Completed"),
        ("SeatReassignment", "Started "), ("SeatReassignment", "Completed")]


def test_injected_5xx_carry_retry_after_when_asked(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=1)
    srv.config.faults.error_rate = 1.0
    srv.config.faults.error_retry_after_s = 7
    with client(srv) as c:
        r = c.get("/v1/customers")
    assert r.status_code in (500, 503) and r.headers["Retry-After"] == "7"
