"""Documented Partner Center behaviours (issue 10), each switched on in the sandbox and met by the client.

Every test runs the real client over HTTP against the sandbox with one behaviour on, and checks the outcome through
the sandbox's own state where there is one. The Microsoft Learn page behind each behaviour is cited in the client and
sandbox code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from d365_migration import (
    AccessDeniedError,
    LookAgainLater,
    NoAvailabilityError,
    PartnerCenterApiError,
    PartnerCenterClient,
    PreconditionFailedError,
    ProvisioningNotReadyError,
    PurchaseRejectedError,
    ReplacementOffers,
    ReplacementTarget,
    RequestAttempt,
    RequestIdReusedError,
    RetiredOfferCatalog,
    RetryAfterTooLongError,
    SubscriptionSuspendedError,
    UpdateAccepted,
    UpdatePendingError,
)
from d365_migration._client import PageRequest
from d365_migration._exceptions import ConfigurationError
from d365_migration._models import CheckoutResult
from d365_tooling.sandbox import (
    DEMO_BEHAVIOURS,
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    PENDING_BEHAVIOURS,
    REPLACEMENT_SKUS,
    SandboxConfig,
    SandboxServer,
    make_token,
    sku_for_offer,
)

NCE_SALES = DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]
PRODUCT, SKU, AVAILABILITY = NCE_SALES.split(":")


def client_for(srv: SandboxServer, **kw: Any) -> PartnerCenterClient:
    options: dict[str, Any] = {"requests_per_minute": None, "license_requests_per_minute": None,
                               "max_retry_after": 5.0}
    options.update(kw)
    credential = options.pop("credential", None)
    return PartnerCenterClient(srv.url, credential, **options)


def expected(srv: SandboxServer) -> list[Any]:
    assert srv.manifest is not None
    return list(srv.manifest.expected)


def first_expected(srv: SandboxServer) -> Any:
    return expected(srv)[0]


def holder_of(srv: SandboxServer) -> tuple[str, str]:
    em = first_expected(srv)
    return em.customer_id, em.user_ids[0]


class StaticToken:
    def __init__(self, token: str) -> None:
        self.token = token

    async def get_token(self, *, force_refresh: bool = False) -> str:
        return self.token


# ----------------------------------------------------------------------------------------------- 5. paging end
async def test_customer_paging_that_ends_in_400_2000_ends_the_listing_cleanly(sandbox_factory: Any) -> None:
    srv = sandbox_factory(customers=7, customer_paging_ends_in_2000=True)
    async with client_for(srv) as client:
        ids = [c.id async for c in client.list_customers(page_size=3)]
    assert sorted(ids) == sorted(srv.state.customer_ids())
    ended = [r for r in srv.state.requests() if r["path"] == "/v1/customers" and r["status"] == 400]
    assert len(ended) == 1  # the continuation on the last page was followed and answered 2000


async def test_users_paging_that_ends_in_400_2000_ends_the_listing_cleanly(sandbox_factory: Any) -> None:
    srv = sandbox_factory(users_paging_ends_in_2000=True)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        ids = [u.id async for u in client.list_users(cid, page_size=2)]
    assert sorted(ids) == sorted(u["id"] for u in srv.state.users(cid))
    assert any(r["status"] == 400 and r["path"].endswith("/users") for r in srv.state.requests())


async def test_a_first_page_answering_2000_is_still_an_error(sandbox: SandboxServer) -> None:
    # only a continuation page may end the listing this way
    async with client_for(sandbox) as client:
        page = client.first_customer_page(5)
        assert not page.is_continuation
        items, nxt = await client.fetch_page(page, what="customers")
        assert items and nxt is not None and nxt.is_continuation


# ----------------------------------------------------------------------------------------------- 6. async PATCH
async def test_patch_answering_202_is_accepted_and_confirmed_by_reading(sandbox_factory: Any) -> None:
    srv = sandbox_factory(patch_accepted=True, patch_apply_delay_s=1.0)
    em = first_expected(srv)
    async with client_for(srv, update_confirm_seconds=10, confirm_poll_seconds=0.2) as client:
        old = await client.get_subscription(em.customer_id, em.subscription_id)
        accepted = await client.set_subscription_status(
            em.customer_id, old, status="suspended", request_id=RequestAttempt.first("suspend", em.subscription_id))
        assert isinstance(accepted, UpdateAccepted)
        assert accepted.location and accepted.location.endswith(em.subscription_id)
        assert (await client.get_subscription(em.customer_id, em.subscription_id)).status == "active"
        # a second PATCH while the first is pending: 409 800082, "look again later"
        with pytest.raises(UpdatePendingError) as pending:
            await client.set_subscription_status(
                em.customer_id, old, status="suspended",
                request_id=RequestAttempt.first("suspend", em.subscription_id).next())
        assert pending.value.code == "800082" and isinstance(pending.value, LookAgainLater)
        confirmed = await client.confirm_subscription_status(em.customer_id, em.subscription_id, "suspended")
    assert confirmed.status == "suspended"
    (patch,) = srv.state.patches()
    assert patch["after_status"] == "suspended" and patch["time"] > patch["accepted_at"]


async def test_update_subscription_confirms_a_202_and_reports_a_slow_one_as_pending(sandbox_factory: Any) -> None:
    srv = sandbox_factory(patch_accepted=True, patch_apply_delay_s=0.3)
    em = first_expected(srv)
    async with client_for(srv, update_confirm_seconds=10, confirm_poll_seconds=0.1) as client:
        old = await client.get_subscription(em.customer_id, em.subscription_id)
        done = await client.update_subscription(em.customer_id, old, status="suspended",
                                                request_id=RequestAttempt.first("suspend", old.id))
        assert done.status == "suspended"
    srv.config.patch_apply_delay_s = 60
    other = expected(srv)[1]
    async with client_for(srv, update_confirm_seconds=0.3, confirm_poll_seconds=0.1) as client:
        old = await client.get_subscription(other.customer_id, other.subscription_id)
        with pytest.raises(UpdatePendingError) as slow:
            await client.update_subscription(other.customer_id, old, status="suspended",
                                             request_id=RequestAttempt.first("suspend", old.id))
    assert slow.value.status == 202 and slow.value.retry_after
    assert srv.state.subscription(other.customer_id, other.subscription_id)["status"] == "active"


async def test_repeated_suspend_answers_800091_as_a_typed_error(sandbox: SandboxServer) -> None:
    em = first_expected(sandbox)
    attempt = RequestAttempt.first("suspend", em.subscription_id)
    async with client_for(sandbox, strict_request_ids=True) as client:
        old = await client.get_subscription(em.customer_id, em.subscription_id)
        await client.update_subscription(em.customer_id, old, status="suspended", request_id=attempt)
        again = await client.get_subscription(em.customer_id, em.subscription_id)
        with pytest.raises(SubscriptionSuspendedError) as info:
            await client.set_subscription_status(em.customer_id, again, status="suspended",
                                                 request_id=attempt.next())
        assert info.value.code == "800091"
        assert (await client.get_subscription(em.customer_id, em.subscription_id)).status == "suspended"
    assert len(sandbox.state.patches()) == 1


# ----------------------------------------------------------------------------------------------- 4. request ids
def test_request_attempts_are_deterministic_and_each_attempt_is_new() -> None:
    first = RequestAttempt.first("checkout", "cust", "cart")
    assert first.request_id == RequestAttempt("checkout", ("cust", "cart"), 0).request_id
    assert first.next().request_id != first.request_id
    assert first.next().attempt == 1 and str(first) == first.request_id
    with pytest.raises(ValueError):
        RequestAttempt("checkout", ("x",), -1)


async def test_a_request_id_that_got_an_answer_is_refused_for_the_next_attempt(sandbox: SandboxServer) -> None:
    cid = first_expected(sandbox).customer_id
    attempt = RequestAttempt.first("cart", cid)
    async with client_for(sandbox, strict_request_ids=True) as client:
        # a business failure is an answer too: the next attempt needs a new id
        with pytest.raises(PurchaseRejectedError):
            await client.create_cart(cid, "CFQ7TTC0NOPE:0001:CFQ7TTC0NOPE", 1, billing_cycle="monthly",
                                     term_duration="P1Y", friendly_name="x", request_id=attempt)
        assert client.was_answered(attempt)
        with pytest.raises(RequestIdReusedError):
            await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                     friendly_name="x", request_id=attempt)
        cart = await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                        friendly_name="x", request_id=attempt.next())
    assert cart.id
    posts = [r for r in sandbox.state.requests() if r["method"] == "POST" and r["path"].endswith("/carts")]
    assert [r["requestId"] for r in posts] == [attempt.request_id, attempt.next().request_id]  # refused one unsent


async def test_a_lenient_client_logs_request_id_reuse(sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    cid = first_expected(sandbox).customer_id
    async with client_for(sandbox) as client:
        for _ in range(2):
            with caplog.at_level(logging.WARNING, logger="d365_migration.client"):
                await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                         friendly_name="x", request_id="7b1f0c7e-9a51-4c52-8d4f-0f2c7b9e6d11")
    assert sum("event=request_id_reused" in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------------------------- 2. buy what exists
def test_replacement_offers_accept_product_sku_catalog_item_and_legacy_guid() -> None:
    legacy = LEGACY_REPLACEMENT_OFFERS["sales"]["faculty"]
    raw = {"sales": {"commercial": f"{PRODUCT}:{SKU}", "students": NCE_SALES, "faculty": legacy}}
    offers = ReplacementOffers.parse(json.dumps(raw))
    product_sku = offers.target("sales", "commercial")
    assert product_sku == ReplacementTarget(f"{PRODUCT}:{SKU}", "product_sku", product_id=PRODUCT, sku_id=SKU)
    full = offers.target("sales", "students")
    assert full is not None and full.availability_id == AVAILABILITY and full.product_key == f"{PRODUCT}:{SKU}".lower()
    old = offers.target("sales", "faculty")
    assert old is not None and old.kind == "legacy" and old.offer_id == legacy
    with pytest.raises(ConfigurationError, match="productId:skuId"):
        ReplacementOffers.parse(json.dumps({"sales": {"commercial": "not-an-offer"}}))


async def test_the_current_availability_is_resolved_and_a_stale_one_is_a_business_failure(
        sandbox_factory: Any) -> None:
    srv = sandbox_factory(availabilities_rotated=True)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        customer = await client.get_customer(cid)
        assert customer.country == "US"
        with pytest.raises(PurchaseRejectedError) as stale:
            await client.create_cart(cid, NCE_SALES, 2, billing_cycle="monthly", term_duration="P1Y",
                                     friendly_name="x", request_id=RequestAttempt.first("cart", cid))
        assert (stale.value.status, stale.value.code, stale.value.stage) == (400, "800009", "cart")
        current = await client.resolve_availability(PRODUCT, SKU, country=customer.country or "US",
                                                    term_duration="P1Y", billing_cycle="monthly")
        assert current.catalog_item_id != NCE_SALES and current.catalog_item_id.startswith(f"{PRODUCT}:{SKU}:")
        cart = await client.create_cart(cid, current.catalog_item_id, 2, billing_cycle="monthly",
                                        term_duration="P1Y", friendly_name="x",
                                        request_id=RequestAttempt.first("cart", cid).next())
        result = await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
        assert result.rejection() is None
        with pytest.raises(NoAvailabilityError) as none:
            await client.resolve_availability(PRODUCT, SKU, country="US", term_duration="P3Y",
                                              billing_cycle="triennial")
        assert "P3Y" in str(none.value) and "P1Y/monthly" in str(none.value)
    (purchase,) = srv.state.purchases()
    assert purchase["offer_id"] == current.catalog_item_id and purchase["quantity"] == 2


async def test_a_cart_line_item_error_is_a_business_failure_with_its_code(sandbox_factory: Any) -> None:
    srv = sandbox_factory(availabilities_rotated=True, stale_availability_mode="line_item_error")
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        with pytest.raises(PurchaseRejectedError) as info:
            await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                     friendly_name="x", request_id=RequestAttempt.first("cart", cid))
    assert info.value.stage == "cart_line_item" and info.value.code == "CatalogItemIdIsNotValid"
    assert srv.state.purchases() == []


async def test_an_availability_that_rotates_before_checkout_answers_400019(sandbox: SandboxServer) -> None:
    cid = first_expected(sandbox).customer_id
    async with client_for(sandbox) as client:
        cart = await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                        friendly_name="x", request_id=RequestAttempt.first("cart", cid))
        sandbox.state.rotate_availability(PRODUCT, SKU)
        with pytest.raises(PurchaseRejectedError) as info:
            await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
    assert (info.value.status, info.value.code, info.value.stage) == (404, "400019", "checkout")
    assert sandbox.state.purchases() == []


def test_checkout_order_errors_become_one_typed_rejection() -> None:
    result = CheckoutResult.parse({"orders": [], "orderErrors": [
        {"orderGroupId": "0", "code": 800017, "description": "The quantity isn't available"},
        {"orderGroupId": "1", "code": 13605, "description": "MCA acceptance missing"}]})
    rejection = result.rejection()
    assert rejection is not None and rejection.code == "800017" and rejection.stage == "order_errors"
    assert "13605" in rejection.description and "MCA" in rejection.description


async def test_a_rejected_legacy_order_is_a_business_failure(sandbox: SandboxServer) -> None:
    cid = first_expected(sandbox).customer_id
    retired = first_expected(sandbox).offer_id
    async with client_for(sandbox) as client:
        with pytest.raises(PurchaseRejectedError) as info:
            await client.create_order(cid, retired, 1, friendly_name="x", billing_cycle="monthly",
                                      request_id=RequestAttempt.first("order", cid))
    assert (info.value.status, info.value.code, info.value.stage) == (403, "2091", "order")


# ----------------------------------------------------------------------------------------------- 12. Retry-After
async def test_a_retry_after_above_the_ceiling_is_look_again_later(sandbox_factory: Any) -> None:
    srv = sandbox_factory(long_retry_after_s=900, long_retry_after_path="/subscriptions")
    cid = first_expected(srv).customer_id
    async with client_for(srv, max_retry_after=60) as client:
        with pytest.raises(RetryAfterTooLongError) as info:
            await client.list_subscriptions(cid)
        assert info.value.retry_after == 900 and isinstance(info.value, LookAgainLater)
        assert await client.list_subscriptions(cid)  # later, the same call works
    statuses = [r["status"] for r in srv.state.requests() if r["path"].endswith("/subscriptions")]
    assert statuses == [429, 200]  # not retried in-call


# ----------------------------------------------------------------------------------------------- 12. warnings
async def test_license_warnings_of_a_successful_update_are_returned(sandbox_factory: Any) -> None:
    srv = sandbox_factory(license_warnings=True)
    em = first_expected(srv)
    cid, uid = em.customer_id, em.user_ids[0]
    new_sku = REPLACEMENT_SKUS[(em.family, em.audience)].id
    srv.state.set_usage_location(cid, uid, "US")
    srv.state.purchase_by_hand(cid, em.replacement_catalog_item_id, em.quantity)
    async with client_for(srv) as client:
        result = await client.update_user_licenses(cid, uid, assign=[new_sku], remove=[em.old_sku_id],
                                                   request_id=RequestAttempt.first("license", cid, uid))
    (update,) = srv.state.license_updates()
    assert [w.code for w in result.warnings] == [w["code"] for w in update["warnings"]] != []
    assert result.warnings[0].message and new_sku.lower() in srv.state.user_licenses(cid, uid)


# ----------------------------------------------------------------------------------------------- 11. access denied
async def test_missing_gdap_roles_are_one_typed_stop_naming_the_roles(sandbox_factory: Any) -> None:
    srv = sandbox_factory()
    em = first_expected(srv)
    srv.config.gdap_missing_roles_customers = [em.customer_id.upper()]
    async with client_for(srv) as client:
        with pytest.raises(AccessDeniedError) as users:
            _ = [u async for u in client.list_users(em.customer_id)]
        assert users.value.reason == "insufficient_privileges" and users.value.code == "900308"
        assert "Directory Reader" in users.value.roles and "Directory Reader" in users.value.fix
        with pytest.raises(AccessDeniedError) as status:
            await client.get_provisioning_status(em.customer_id, em.subscription_id)
        assert not isinstance(status.value, PartnerCenterApiError)  # never swallowed as a "not found"
        assert status.value.roles == ("Directory Reader", "Global Reader")
        with pytest.raises(AccessDeniedError):
            await client.list_subscribed_skus(em.customer_id)
        other = next(e for e in expected(srv) if e.customer_id != em.customer_id)
        assert await client.list_subscribed_skus(other.customer_id)
        assert await client.list_subscriptions(em.customer_id)  # commerce calls need no directory role


@pytest.mark.parametrize("switch,status,code,reason", [
    ("mfa_missing_customers", 401, "900421", "mfa_required"),
    ("conditional_access_customers", 403, "900309", "conditional_access"),
])
async def test_mfa_and_conditional_access_on_license_updates_are_access_denied(
        sandbox_factory: Any, switch: str, status: int, code: str, reason: str) -> None:
    srv = sandbox_factory()
    em = first_expected(srv)
    cid, uid = em.customer_id, em.user_ids[0]
    setattr(srv.config, switch, [cid])
    before = srv.state.user_licenses(cid, uid)
    async with client_for(srv) as client:
        with pytest.raises(AccessDeniedError) as info:
            await client.update_user_licenses(cid, uid, assign=[], remove=[em.old_sku_id],
                                              request_id=RequestAttempt.first("license", cid, uid))
    assert (info.value.status, info.value.code, info.value.reason) == (status, code, reason)
    assert "consent" in info.value.fix
    assert srv.state.user_licenses(cid, uid) == before and srv.state.license_updates() == []


async def test_an_app_only_token_on_license_calls_is_access_denied(sandbox_factory: Any) -> None:
    srv = sandbox_factory(require_auth=True)
    cid, uid = holder_of(srv)
    async with client_for(srv, credential=StaticToken(make_token(app_only=True))) as client:
        with pytest.raises(AccessDeniedError) as info:
            await client.update_user_licenses(cid, uid, assign=[], remove=["x"],
                                              request_id=RequestAttempt.first("license", cid, uid))
    assert info.value.reason == "app_only_token" and info.value.code == "900316"


# ----------------------------------------------------------------------------------------------- 7. lag
async def test_provisioning_status_answers_800007_then_pending_then_success(sandbox_factory: Any) -> None:
    srv = sandbox_factory(provisioning_status_lag_s=1.6)
    em = first_expected(srv)
    new = srv.state.purchase_by_hand(em.customer_id, em.replacement_catalog_item_id, 3)
    async with client_for(srv) as client:
        with pytest.raises(ProvisioningNotReadyError) as info:
            await client.get_provisioning_status(em.customer_id, new["id"])
        assert info.value.code == "800007" and isinstance(info.value, LookAgainLater)
        await asyncio.sleep(0.9)
        assert (await client.get_provisioning_status(em.customer_id, new["id"])).status == "pending"
        await asyncio.sleep(0.9)
        done = await client.get_provisioning_status(em.customer_id, new["id"])
    assert done.status == "success" and done.sku_id == sku_for_offer(em.replacement_catalog_item_id).id  # type: ignore[union-attr]


async def test_subscribed_skus_show_a_new_subscription_only_after_their_lag(sandbox_factory: Any) -> None:
    srv = sandbox_factory(subscribed_skus_lag_s=1.0)
    em = first_expected(srv)
    new_sku = REPLACEMENT_SKUS[(em.family, em.audience)].id.lower()
    srv.state.purchase_by_hand(em.customer_id, em.replacement_catalog_item_id, 4)
    async with client_for(srv) as client:
        early = {s.product_sku.id.lower(): s for s in await client.list_subscribed_skus(em.customer_id)}
        await asyncio.sleep(1.2)
        late = {s.product_sku.id.lower(): s for s in await client.list_subscribed_skus(em.customer_id)}
    assert early.get(new_sku) is None or early[new_sku].total_units == 0
    assert late[new_sku].total_units == 4


# ----------------------------------------------------------------------------------------------- 3. without tags
async def test_new_commerce_purchases_are_found_without_tags(sandbox_factory: Any) -> None:
    srv = sandbox_factory(nce_product_friendly_names=True)
    cid = first_expected(srv).customer_id
    before = datetime.now(UTC) - timedelta(seconds=5)
    async with client_for(srv) as client:
        cart = await client.create_cart(cid, NCE_SALES, 3, billing_cycle="monthly", term_duration="P1Y",
                                        friendly_name="Replacement [d365mig-abc]",
                                        request_id=RequestAttempt.first("cart", cid))
        result = await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
        (order,) = result.orders
        assert "[d365mig-abc]" not in (order.line_items[0].friendly_name or "")  # the product name, not ours
        found = await client.find_orders(cid, f"{PRODUCT}:{SKU}", 3, created_after=before)
        assert [o.id for o in found] == [order.id]
        assert await client.find_orders(cid, f"{PRODUCT}:{SKU}", 4, created_after=before) == []
        (sub,) = await client.list_subscriptions(cid, order_id=order.id)
    assert sub.friendly_name == REPLACEMENT_SKUS[("sales", "commercial")].name
    (purchase,) = srv.state.purchases()
    assert purchase["friendly_name"] == "Replacement [d365mig-abc]"  # what we sent, kept by the sandbox
    assert purchase["listed_friendly_name"] == sub.friendly_name


# ----------------------------------------------------------------------------------------------- 10. reseller
async def test_the_reseller_of_record_is_read_and_carried_by_both_purchase_paths(sandbox_factory: Any) -> None:
    from d365_tooling.sandbox import seed_world

    srv = sandbox_factory(customers=0)
    manifest = seed_world(srv.state, customers=8, seed=1, indirect_resellers=True)
    em = next(e for e in manifest.expected if e.reseller_partner_id)
    async with client_for(srv) as client:
        old = await client.get_subscription(em.customer_id, em.subscription_id)
        assert old.partner_id == em.reseller_partner_id
        cart = await client.create_cart(em.customer_id, NCE_SALES, 1, billing_cycle="monthly",
                                        term_duration="P1Y", friendly_name="x",
                                        request_id=RequestAttempt.first("cart", em.customer_id),
                                        reseller_partner_id=old.partner_id)
        await client.checkout_cart(em.customer_id, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
        order = await client.create_order(em.customer_id, LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"], 1,
                                          friendly_name="x", billing_cycle="monthly",
                                          request_id=RequestAttempt.first("order", em.customer_id),
                                          partner_id_on_record=old.partner_id)
        assert order.line_items[0].partner_id_on_record == em.reseller_partner_id
        new_subs = [s for s in await client.list_subscriptions(em.customer_id) if s.id != old.id and s.partner_id]
    assert [p["reseller_partner_id"] for p in srv.state.purchases()] == [em.reseller_partner_id] * 2
    assert {s.partner_id for s in new_subs} >= {em.reseller_partner_id}


# ----------------------------------------------------------------------------------------------- 8, 9. detection data
async def test_pooled_skus_unrecognised_offers_and_hidden_end_dates_are_seeded_and_readable(
        sandbox_factory: Any) -> None:
    from d365_tooling.sandbox import seed_world

    srv = sandbox_factory(customers=0)
    manifest = seed_world(srv.state, customers=8, seed=3, pooled_skus=True, unrecognised_offers=True,
                          hidden_end_dates=True)
    catalog = RetiredOfferCatalog.load()
    async with client_for(srv) as client:
        pooled = manifest.pooled[0]
        subs = await client.list_subscriptions(pooled.customer_id)
        granting = [s for s in subs if (catalog.match(s.offer_id, s.offer_name) is not None and s.status == "active"
                                        and sku_for_offer(s.offer_id or "").id.lower() == pooled.sku_id)]  # type: ignore[union-attr]
        assert {s.id.lower() for s in granting} >= {pooled.subscription_id.lower(),
                                                    pooled.other_subscription_id.lower()}
        retiring = next(s for s in granting if s.id.lower() == pooled.subscription_id.lower())
        skus = {s.product_sku.id.lower(): s for s in await client.list_subscribed_skus(pooled.customer_id)}
        assert skus[pooled.sku_id].consumed_units == len(pooled.holders) > retiring.quantity - 5

        odd = manifest.unrecognised[0]
        listed = {s.id.lower(): s for s in await client.list_subscriptions(odd.customer_id)}
        verdict = catalog.classify(listed[odd.subscription_id.lower()].offer_id, odd.offer_name)
        assert verdict.offer is None and verdict.unrecognised
        known = next(e for e in manifest.expected if e.customer_id == odd.customer_id)
        assert catalog.classify(None, known.offer_name_as_listed).matched_by == "name"

        hidden = next(e for e in manifest.expected if e.end_date_source == "provisioningStatus")
        sub = await client.get_subscription(hidden.customer_id, hidden.subscription_id)
        status = await client.get_provisioning_status(hidden.customer_id, hidden.subscription_id)
    assert not sub.end_date_known and sub.commitment_end is not None and sub.commitment_end.year == 9999
    assert status.end_date is not None and status.end_date.isoformat()[:10] == hidden.commitment_end_date[:10]


def test_the_demo_and_pending_behaviour_lists_name_real_switches() -> None:
    config = SandboxConfig.realistic(include_pending=True)
    for name, value in {**DEMO_BEHAVIOURS, **PENDING_BEHAVIOURS}.items():
        assert getattr(config, name) == value
    # every documented behaviour the steps handle is on in the demo preset; the plain config stays quiet
    assert SandboxConfig.realistic().nce_product_friendly_names and SandboxConfig.realistic().patch_accepted
    assert not SandboxConfig().nce_product_friendly_names and not SandboxConfig().availabilities_rotated
    with pytest.raises(TypeError):
        SandboxConfig.realistic(no_such_switch=True)


# ----------------------------------------------------------------------------------------------- Learn's example shapes
@pytest.mark.parametrize(("absolute", "prefix"), [(True, ""), (True, "/V1"), (False, "/V1"), (False, "/v1")])
async def test_next_links_absolute_or_with_a_v1_prefix_are_followed(sandbox_factory: Any, absolute: bool,
                                                                    prefix: str) -> None:
    srv = sandbox_factory(customers=7, absolute_next_links=absolute, next_link_v1_prefix=prefix)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        ids = [c.id async for c in client.list_customers(page_size=3)]
        users = [u.id async for u in client.list_users(cid, page_size=2)]
        _, nxt = await client.customer_page(client.first_customer_page(3))
    assert sorted(ids) == sorted(srv.state.customer_ids())
    assert sorted(users) == sorted(u["id"] for u in srv.state.users(cid))
    assert nxt is not None and PageRequest.from_json(nxt.to_json()) == nxt  # a queued scan cursor loads


async def test_the_country_is_read_from_the_company_profile_when_the_billing_profile_has_none(
        sandbox_factory: Any) -> None:
    srv = sandbox_factory(country_only_in_company_profile=True)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        assert (await client.get_customer(cid)).country == "US"
        countries = {c.country async for c in client.list_customers()}
    assert countries == {"US"}  # every seeded customer is in the US


async def test_a_bare_availability_and_a_checkout_answering_the_bare_order_buy_once(sandbox_factory: Any) -> None:
    srv = sandbox_factory(availabilities_bare_object=True, checkout_answers_bare_order=True)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        current = await client.resolve_availability(PRODUCT, SKU, country="US", term_duration="P1Y",
                                                    billing_cycle="monthly", segment="commercial")
        cart = await client.create_cart(cid, current.catalog_item_id, 2, billing_cycle="monthly",
                                        term_duration="P1Y", friendly_name="x",
                                        request_id=RequestAttempt.first("cart", cid))
        result = await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
        again = await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id).next())
    (purchase,) = srv.state.purchases()
    assert result.rejection() is None and [o.id for o in result.orders] == [purchase["order_id"]]
    assert [o.id for o in again.orders] == [purchase["order_id"]]  # the replayed result, bare as well


async def test_carts_and_orders_pass_a_service_that_requires_the_partner_attestation(sandbox_factory: Any) -> None:
    srv = sandbox_factory(require_partner_attestation=True)
    cid = first_expected(srv).customer_id
    async with client_for(srv) as client:
        cart = await client.create_cart(cid, NCE_SALES, 1, billing_cycle="monthly", term_duration="P1Y",
                                        friendly_name="x", request_id=RequestAttempt.first("cart", cid))
        assert (await client.checkout_cart(cid, cart.id, request_id=RequestAttempt.first("checkout", cart.id))
                ).rejection() is None
        await client.create_order(cid, LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"], 1, friendly_name="x",
                                  billing_cycle="annual", request_id=RequestAttempt.first("order", cid))
    assert [p["via"] for p in srv.state.purchases()] == ["cart", "order"]


async def test_availabilities_of_every_segment_are_listed_and_the_wanted_one_is_chosen(sandbox_factory: Any) -> None:
    srv = sandbox_factory(availabilities_in_all_segments=True)
    async with client_for(srv) as client:
        everything = await client.list_availabilities(PRODUCT, SKU, country="US")
        chosen = {segment: await client.resolve_availability(PRODUCT, SKU, country="US", term_duration="P1Y",
                                                             billing_cycle="monthly", segment=segment)
                  for segment in ("commercial", "education", "government")}
        gb = await client.list_availabilities(PRODUCT, SKU, country="GB")
    assert [a.segment for a in everything] == ["education", "commercial", "government"]  # no nonprofit unasked
    assert {s: a.segment for s, a in chosen.items()} == {s: s for s in chosen}
    assert chosen["commercial"].catalog_item_id == NCE_SALES
    assert len({a.catalog_item_id for a in chosen.values()}) == 3
    assert [a.segment for a in gb] == ["education", "commercial"]  # government only in the US
    requests = [r for r in srv.state.requests() if r["path"].endswith("/availabilities")]
    assert "targetSegment=commercial" in requests[1]["query"]


async def test_a_5xx_carrying_retry_after_is_waited_for(sandbox_factory: Any) -> None:
    srv = sandbox_factory()
    srv.config.faults.error_rate = 1.0
    srv.config.faults.error_retry_after_s = 3
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    cid = first_expected(srv).customer_id
    async with client_for(srv, sleep=sleep, max_attempts=3, backoff_base=0.01) as client:
        with pytest.raises(PartnerCenterApiError) as info:
            await client.list_subscriptions(cid)
    assert info.value.status in (500, 503)
    assert slept == [3.0, 3.0]


async def test_an_etag_compared_literally_is_matched_when_sent_as_received(sandbox_factory: Any) -> None:
    srv = sandbox_factory(etag_literal_match=True)
    em = first_expected(srv)
    attempt = RequestAttempt.first("suspend", em.customer_id, em.subscription_id)
    async with client_for(srv) as client:
        old = await client.get_subscription(em.customer_id, em.subscription_id)
        with pytest.raises(PreconditionFailedError):
            await client.update_subscription(em.customer_id, old, status="suspended", request_id=attempt)
        again = await client.get_subscription(em.customer_id, em.subscription_id)
        assert again.etag == old.etag  # nothing changed: the quoted form was what the service refused
        done = await client.update_subscription(em.customer_id, again, status="suspended",
                                                request_id=attempt.next(), etag_form="as_received")
    assert done.status == "suspended" and len(srv.state.patches()) == 1
