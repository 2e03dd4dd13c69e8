"""The Partner Center client: headers, retries with the same MS-RequestId, 429, typed errors, paging, validation.

These use httpx's MockTransport to produce exact wire answers (both error body shapes, HTML pages, truncated JSON,
resets); the end-to-end tests run the same client against the sandbox over real HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from d365_migration import (
    ClientError,
    ConflictError,
    MalformedResponseError,
    NotFoundError,
    PartnerCenterClient,
    PreconditionFailedError,
    RequestNotSentError,
    ResponseLostError,
    ServerError,
    TransportError,
    UncertainWriteError,
)
from d365_migration._client import PageRequest, RequestAttempt, map_error
from d365_migration._exceptions import NoAvailabilityError, RetryAfterTooLongError
from d365_migration._models import (
    FAR_FUTURE_YEAR,
    CheckoutResult,
    Customer,
    SubscribedSku,
    Subscription,
    parse_datetime,
    segment_for_audience,
)
from d365_migration._native_client import Transition

CUST = "3f9b2d10-6c2e-4b8f-a1d4-7e5c9a0b2f61"
SUB = "5f3c1a9e-2b7d-4c1e-9a55-0d2f6e8b1c43"
SECRET_TOKEN = "eyJ-very-secret-access-token"


class FakeToken:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def get_token(self, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return SECRET_TOKEN + ("-refreshed" if force_refresh else "")


class NoSleep:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def make_client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> tuple[PartnerCenterClient,
                                                                                          NoSleep]:
    sleep = NoSleep()
    options: dict[str, object] = {"requests_per_minute": None, "license_requests_per_minute": None,
                                  "transport": httpx.MockTransport(handler), "sleep": sleep}
    options.update(kw)
    client = PartnerCenterClient("https://pc.test", FakeToken(), **options)  # type: ignore[arg-type]
    return client, sleep


def sub_json(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"id": SUB, "offerId": "X", "offerName": "Y", "quantity": 5, "status": "active",
                               "autoRenewEnabled": False, "commitmentEndDate": "2026-12-01T00:00:00Z",
                               "attributes": {"etag": "abc", "objectType": "Subscription"}}
    base.update(over)
    return base


async def test_sends_documented_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler)
    await client.get_subscription(CUST, SUB)
    h = seen[0].headers
    assert h["Authorization"] == f"Bearer {SECRET_TOKEN}"
    assert h["Accept"] == "application/json"
    assert h["MS-Contract-Version"] == "v1"
    assert len(h["MS-RequestId"]) == 36 and len(h["MS-CorrelationId"]) == 36
    assert seen[0].url.path == f"/v1/customers/{CUST}/subscriptions/{SUB}"


async def test_5xx_is_retried_with_the_same_request_id_and_new_correlation_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return httpx.Response(503, json={"code": 800003, "description": "Unexpected", "source": "PartnerFD"})
        return httpx.Response(200, json=sub_json())

    client, sleep = make_client(handler)
    await client.get_subscription(CUST, SUB)
    assert len(seen) == 3
    assert len({r.headers["MS-RequestId"] for r in seen}) == 1
    assert len({r.headers["MS-CorrelationId"] for r in seen}) == 3
    assert len(sleep.slept) == 2


async def test_timeouts_and_resets_are_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ReadTimeout("slow", request=request)
        if calls == 2:
            raise httpx.RemoteProtocolError("reset", request=request)
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler)
    assert (await client.get_subscription(CUST, SUB)).id == SUB
    assert calls == 3


async def test_gives_up_with_a_typed_error() -> None:
    client, _ = make_client(lambda r: httpx.Response(500, json={"code": 800003, "description": "boom"}),
                            max_attempts=3)
    with pytest.raises(ServerError) as info:
        await client.get_subscription(CUST, SUB)
    assert info.value.status == 500 and info.value.code == "800003"


async def test_429_honours_retry_after() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            body = {"statusCode": 429, "message": "Rate limit is exceeded. Try again in 7 seconds."}
            return httpx.Response(429, headers={"Retry-After": "7"}, json=body)
        return httpx.Response(200, json=sub_json())

    client, sleep = make_client(handler)
    await client.get_subscription(CUST, SUB)
    assert 7.0 in sleep.slept
    assert client.stats.throttled == 1


async def test_429_with_an_http_date_retry_after_waits_until_that_date() -> None:
    """RFC 9110 allows Retry-After as an HTTP-date; a proxy in front of Partner Center may send one."""
    from email.utils import format_datetime

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
            return httpx.Response(429, headers={"Retry-After": when}, json={"statusCode": 429, "message": "x"})
        return httpx.Response(200, json=sub_json())

    client, sleep = make_client(handler)
    await client.get_subscription(CUST, SUB)
    assert any(25 <= s <= 31 for s in sleep.slept), sleep.slept


async def test_429_slows_the_shared_limiter() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, headers={"Retry-After": "3"}, json={"statusCode": 429, "message": "x"})
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler, requests_per_minute=600)
    limiter = client._limiters["commerce"]
    assert limiter is not None
    before = limiter.rate
    await client.get_subscription(CUST, SUB)
    assert limiter.rate < before  # the whole client slowed down, not just that request
    assert limiter.throttle_events == 1


async def test_non_idempotent_write_is_not_retried_after_an_ambiguous_failure() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(502, text="<html>bad gateway</html>", headers={"Content-Type": "text/html"})

    client, _ = make_client(handler)
    with pytest.raises(ServerError) as info:
        await client.create_order(CUST, "7A1C2E3B-4D5F-4A6B-8C9D-0E1F2A3B4C5D", 3, friendly_name="x",
                                  billing_cycle="monthly", request_id="11111111-1111-1111-1111-111111111111")
    assert calls == 1
    assert getattr(info.value, "maybe_applied", False) is True
    assert isinstance(info.value, UncertainWriteError)  # named for what it means, not flagged afterwards


async def test_connect_error_is_retried_even_for_a_non_idempotent_write() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(201, json={"id": "o1", "status": "pending", "lineItems": []})

    client, _ = make_client(handler)
    order = await client.create_order(CUST, "7A1C2E3B-4D5F-4A6B-8C9D-0E1F2A3B4C5D", 3, friendly_name="x",
                                      billing_cycle="monthly", request_id="11111111-1111-1111-1111-111111111111")
    assert order.id == "o1" and calls == 2


async def test_401_refreshes_the_token_once() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        if len(seen) == 1:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler)
    await client.get_subscription(CUST, SUB)
    assert seen[1].endswith("-refreshed")


@pytest.mark.parametrize("status,body,cls,code", [
    (400, {"code": 60012, "description": "out of licenses", "data": ["x"], "source": "PartnerFD"}, ClientError,
     "60012"),
    (404, {"code": "20003", "description": "Subscription not found", "source": "PartnerFD"}, NotFoundError, "20003"),
    (409, {"code": 800064, "description": "Cart being processed"}, ConflictError, "800064"),
    (400, {"code": 2055, "description": "Etag is no longer valid"}, PreconditionFailedError, "2055"),
    (412, {"code": 412, "description": "Precondition failed"}, PreconditionFailedError, "412"),
    (403, {"code": 600061, "message": "Agreement exists", "description": "Already", "errorName": "X",
           "isRetryable": False}, ClientError, "600061"),
])
async def test_typed_errors_carry_code_and_description(status: int, body: dict[str, object], cls: type,
                                                       code: str) -> None:
    client, _ = make_client(lambda r: httpx.Response(status, json=body))
    with pytest.raises(cls) as info:
        await client.get_subscription(CUST, SUB)
    assert info.value.code == code
    assert info.value.status == status
    assert SECRET_TOKEN not in str(info.value)


@pytest.mark.parametrize("response", [
    httpx.Response(200, text="<html><body>Service Unavailable</body></html>", headers={"Content-Type": "text/html"}),
    httpx.Response(200, text='{"id": "abc", "status": "act', headers={"Content-Type": "application/json"}),
    httpx.Response(200, json=["not", "an", "object"]),
    httpx.Response(200, json={"status": "active"}),  # no id
])
async def test_broken_responses_raise_malformed(response: httpx.Response) -> None:
    client, _ = make_client(lambda r: response)
    with pytest.raises(MalformedResponseError):
        await client.get_subscription(CUST, SUB)


async def test_unknown_status_and_extra_fields_are_tolerated() -> None:
    pascal = {k[0].upper() + k[1:]: v for k, v in sub_json(status="EXPIRED", id=SUB.upper()).items()}
    client, _ = make_client(lambda r: httpx.Response(200, json={
        "totalCount": 3, "items": [sub_json(status="pendingDeletion", newField={"x": 1}), pascal,
                                   sub_json(status=None)],
        "attributes": {"objectType": "Collection"}}))
    subs = await client.list_subscriptions(CUST)
    assert [s.status for s in subs] == ["pendingdeletion", "expired", "unknown"]


@pytest.mark.parametrize("bad", ["../other", "a/b", "", "x" * 200, "abc?x=1", "%2e%2e"])
async def test_ids_are_validated_before_they_go_into_a_path(bad: str) -> None:
    client, _ = make_client(lambda r: httpx.Response(200, json=sub_json()))
    with pytest.raises(ValueError):
        await client.get_subscription(bad, SUB)
    with pytest.raises(ValueError):
        await client.get_subscription(CUST, bad)


def _page(ids: list[str], **extra: object) -> dict[str, object]:
    return {"totalCount": len(ids), "items": [{"id": i, "companyProfile": {"companyName": i}} for i in ids],
            "attributes": {"objectType": "Collection"}, **extra}


async def test_paging_follows_links_next_with_its_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        token = request.headers.get("MS-ContinuationToken")
        if token is None:
            return httpx.Response(200, json=_page(["a", "b"], links={"next": {
                "uri": "/customers?size=2&seekOperation=Next", "method": "GET",
                "headers": [{"key": "MS-ContinuationToken", "value": "T1"},
                            {"key": "Authorization", "value": "Bearer evil"}]}}))
        assert token == "T1"
        return httpx.Response(200, json=_page(["c"]))

    client, _ = make_client(handler)
    ids = [c.id async for c in client.list_customers(page_size=2)]
    assert ids == ["a", "b", "c"]
    assert seen[1].url.path == "/v1/customers"
    assert seen[1].url.params["seekOperation"] == "Next"
    assert seen[1].headers["Authorization"] == f"Bearer {SECRET_TOKEN}"  # a response cannot set our auth header


async def test_paging_falls_back_to_continuation_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("MS-ContinuationToken") == "T1":
            assert request.url.params["seekOperation"] == "next"
            return httpx.Response(200, json=_page(["c"]))
        return httpx.Response(200, json=_page(["a", "b"], continuationToken="T1"))

    client, _ = make_client(handler)
    assert [c.id async for c in client.list_customers()] == ["a", "b", "c"]


async def test_paging_refuses_a_foreign_host_and_a_loop() -> None:
    client, _ = make_client(lambda r: httpx.Response(200, json=_page(["a"], links={"next": {
        "uri": "https://evil.example/v1/customers", "headers": []}})))
    with pytest.raises(MalformedResponseError):
        _ = [c async for c in client.list_customers()]
    client, _ = make_client(lambda r: httpx.Response(200, json=_page(["a"], continuationToken="SAME")))
    with pytest.raises(MalformedResponseError):
        _ = [c async for c in client.list_customers()]


async def test_patch_sends_the_whole_resource_with_if_match() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=sub_json(status="suspended"))

    client, _ = make_client(handler)
    current = Subscription.parse(sub_json(autoRenewEnabled=False, friendlyName="keep me"))
    updated = await client.update_subscription(CUST, current, status="suspended",
                                               request_id="22222222-2222-2222-2222-222222222222")
    body = json.loads(seen[0].content)
    assert body["status"] == "suspended"
    assert body["autoRenewEnabled"] is False and body["friendlyName"] == "keep me" and body["quantity"] == 5
    assert seen[0].headers["If-Match"] == '"abc"'
    assert updated.status == "suspended"


@given(st.dictionaries(st.sampled_from(["id", "status", "quantity", "autoRenewEnabled", "commitmentEndDate",
                                        "offerName", "attributes"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30),
                                 st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))))
def test_subscription_parser_only_raises_malformed(data: dict[str, object]) -> None:
    try:
        sub = Subscription.parse(data)
    except MalformedResponseError:
        return
    assert sub.id and sub.status == sub.status.lower()


async def test_transport_error_after_retries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, _ = make_client(handler, max_attempts=2)
    with pytest.raises(TransportError) as info:
        await client.get_subscription(CUST, SUB)
    assert isinstance(info.value, RequestNotSentError) and info.value.maybe_applied is False


async def test_a_write_whose_answer_is_lost_raises_response_lost_at_once() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadTimeout("no answer", request=request)

    client, _ = make_client(handler)
    with pytest.raises(ResponseLostError) as info:
        await client.create_order(CUST, "7A1C2E3B-4D5F-4A6B-8C9D-0E1F2A3B4C5D", 3, friendly_name="x",
                                  billing_cycle="monthly", request_id="11111111-1111-1111-1111-111111111111")
    assert calls == 1 and info.value.maybe_applied is True
    assert isinstance(info.value, TransportError)


async def test_a_read_whose_answer_is_lost_is_retried_with_the_same_request_id() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["MS-RequestId"])
        if len(seen) == 1:
            raise httpx.RemoteProtocolError("reset", request=request)
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler)
    await client.get_subscription(CUST, SUB)
    assert len(seen) == 2 and seen[0] == seen[1]


@pytest.mark.parametrize(("status", "code", "expected"), [
    (404, None, NotFoundError),
    (409, "800060", ConflictError),
    (412, None, PreconditionFailedError),
    (400, "2055", PreconditionFailedError),
    (400, "2091", ClientError),
    (403, None, ClientError),
    (500, None, ServerError),
    (503, "800003", ServerError),
])
def test_map_error_is_one_table_from_status_and_code_to_exception(status: int, code: str | None,
                                                                   expected: type[Exception]) -> None:
    assert map_error(status, code) is expected
    assert map_error(500, None, uncertain_write=True) is UncertainWriteError


async def test_retry_log_lines_carry_the_migrations_correlation_id(caplog: pytest.LogCaptureFixture) -> None:
    from d365_migration._context import current_correlation_id

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, headers={"Retry-After": "1"}, json={"statusCode": 429, "message": "x"})
        if calls == 2:
            return httpx.Response(503, json={"code": 1, "description": "busy"})
        return httpx.Response(200, json=sub_json())

    client, _ = make_client(handler)
    token = current_correlation_id.set("0d6f3c52-4b1e-5d7a-9c3e-2f1a0b9c8d7e")
    try:
        with caplog.at_level("INFO", logger="d365_migration.client"):
            await client.get_subscription(CUST, SUB)
    finally:
        current_correlation_id.reset(token)
    lines = [r.getMessage() for r in caplog.records if r.name == "d365_migration.client"]
    assert len(lines) >= 2
    assert all(line.startswith("[0d6f3c52-4b1e-5d7a-9c3e-2f1a0b9c8d7e] ") for line in lines)


# ---------------------------------------------------------------------- shapes Learn's examples show (audit 2026)


def _two_pages(next_uri: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("MS-ContinuationToken") == "T1":
            return httpx.Response(200, json=_page(["c"]))
        return httpx.Response(200, json=_page(["a", "b"], links={"next": {
            "uri": next_uri, "method": "GET", "headers": [{"key": "MS-ContinuationToken", "value": "T1"}]}}))
    return handler


@pytest.mark.parametrize("next_uri", ["https://pc.test/v1/customers?size=2&seekOperation=Next",
                                      "HTTPS://PC.TEST:443/V1/customers?size=2&seekOperation=Next",
                                      "/V1/customers?size=2&seekOperation=Next"])
async def test_paging_follows_an_absolute_next_link_on_our_own_endpoint(next_uri: str) -> None:
    seen: list[httpx.Request] = []
    handler = _two_pages(next_uri)

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client, _ = make_client(recording)
    assert [c.id async for c in client.list_customers(page_size=2)] == ["a", "b", "c"]
    assert str(seen[1].url) == "https://pc.test/v1/customers?size=2&seekOperation=Next"
    _, nxt = await client.customer_page(client.first_customer_page(2))
    assert nxt is not None and nxt.path == "/v1/customers"
    # the cursor travels in a queue message and loads again
    assert PageRequest.from_json(json.loads(json.dumps(nxt.to_json()))) == nxt


async def test_an_absolute_next_link_keeps_the_endpoint_path_prefix_and_other_hosts_are_refused() -> None:
    seen: list[httpx.Request] = []
    handler = _two_pages("https://pc.test/partner/v1/customers?size=2&seekOperation=Next")

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = PartnerCenterClient("https://pc.test/partner", FakeToken(), requests_per_minute=None,
                                 license_requests_per_minute=None, transport=httpx.MockTransport(recording),
                                 sleep=NoSleep())
    assert [c.id async for c in client.list_customers(page_size=2)] == ["a", "b", "c"]
    assert seen[1].url.path == "/partner/v1/customers"
    for foreign in ("http://pc.test/v1/customers", "https://pc.test:8443/v1/customers",
                    "https://pc.test.evil.example/v1/customers", "https://pc.test/other/v1/customers"):
        client = PartnerCenterClient("https://pc.test/partner", FakeToken(), requests_per_minute=None,
                                     license_requests_per_minute=None,
                                     transport=httpx.MockTransport(_two_pages(foreign)), sleep=NoSleep())
        with pytest.raises(MalformedResponseError, match="another host"):
            _ = [c async for c in client.list_customers()]


def test_a_saved_cursor_with_an_upper_case_v1_loads() -> None:
    page = PageRequest.from_json({"path": "/V1/customers", "params": [["size", "500"]],
                                  "headers": [["MS-ContinuationToken", "T"]]})
    assert page.path == "/v1/customers" and page.is_continuation
    with pytest.raises(ValueError):
        PageRequest.from_json({"path": "/V1/products", "params": [], "headers": []})


async def test_a_5xx_with_retry_after_waits_at_least_that_long() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return httpx.Response(503, headers={"Retry-After": "40"},
                                  json={"code": 800003, "description": "Try again later"})
        return httpx.Response(200, json=sub_json())

    client, sleep = make_client(handler, backoff_base=0.01, backoff_max=1.0)
    await client.get_subscription(CUST, SUB)
    assert calls == 3 and sleep.slept == [40.0, 40.0]
    # above what the client sleeps in one call: look again later, as before
    client, sleep = make_client(lambda r: httpx.Response(503, headers={"Retry-After": "900"}, json={}))
    with pytest.raises(RetryAfterTooLongError):
        await client.get_subscription(CUST, SUB)
    assert sleep.slept == []


async def test_carts_and_orders_carry_the_partner_on_record_attestation() -> None:
    bodies: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if request.url.path.endswith("/carts"):
            return httpx.Response(201, json={"id": "cart-1", "status": "Active", "lineItems": []})
        return httpx.Response(201, json={"id": "order-1", "status": "pending", "lineItems": []})

    client, _ = make_client(handler)
    await client.create_cart(CUST, "P:S:A", 2, billing_cycle="monthly", term_duration="P1Y", friendly_name="x",
                             request_id="33333333-3333-3333-3333-333333333333")
    await client.create_order(CUST, "7b9c4f6e-1a2b-4c3d-9e8f-0a1b2c3d4e5f", 2, friendly_name="x",
                              billing_cycle="annual", request_id="44444444-4444-4444-4444-444444444444")
    assert [b.get("PartnerOnRecordAttestationAccepted") for b in bodies] == [True, True]


@pytest.mark.parametrize(("form", "sent"), [("quoted", '"abc"'), ("as_received", "abc")])
async def test_the_etag_can_be_sent_quoted_or_exactly_as_received(form: str, sent: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=sub_json(status="suspended"))

    client, _ = make_client(handler)
    await client.update_subscription(CUST, Subscription.parse(sub_json()), status="suspended",
                                     request_id="55555555-5555-5555-5555-555555555555",
                                     etag_form=form)  # type: ignore[arg-type]
    assert seen[0].headers["If-Match"] == sent


_AVAILABILITY = {"productId": "CFQ7TTC0LH18", "skuId": "0001", "country": "US", "isPurchasable": True,
                 "terms": [{"duration": "P1Y", "billingCycle": "Annual"}]}


def _availability(aid: str, segment: str) -> dict[str, object]:
    return {**_AVAILABILITY, "id": aid, "catalogItemId": f"CFQ7TTC0LH18:0001:{aid}", "segment": segment}


async def test_the_availability_of_the_wanted_segment_is_bought_even_if_the_filter_is_ignored() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)  # a service that ignores targetSegment and lists education first
        return httpx.Response(200, json={"items": [_availability("EDU1", "Education"),
                                                   _availability("COM1", "Commercial")]})

    client, _ = make_client(handler)
    found = await client.resolve_availability("CFQ7TTC0LH18", "0001", country="us", term_duration="P1Y",
                                              billing_cycle="annual", segment="commercial")
    assert found.catalog_item_id.endswith(":COM1")
    assert seen[0].url.params["targetSegment"] == "commercial"
    found = await client.resolve_availability("CFQ7TTC0LH18", "0001", country="us", term_duration="P1Y",
                                              billing_cycle="annual", segment="education")
    assert found.catalog_item_id.endswith(":EDU1")
    with pytest.raises(NoAvailabilityError, match="segment government"):
        await client.resolve_availability("CFQ7TTC0LH18", "0001", country="us", term_duration="P1Y",
                                          billing_cycle="annual", segment="government")


def test_each_audience_buys_its_segment() -> None:
    assert [segment_for_audience(a) for a in ("commercial", "faculty", "students", "government", None)] == [
        "commercial", "education", "education", "government", "commercial"]
    with pytest.raises(ValueError):
        segment_for_audience("nonprofit")


async def test_a_bare_availability_and_a_bare_checkout_order_are_accepted() -> None:
    order = {"id": "a68736758d9c", "status": "pending", "creationDate": "2023-04-18T22:03:45.4505136Z",
             "lineItems": [{"lineItemNumber": 0, "offerId": "CFQ7TTC0LF8S:0001:CFQ7TTC0N81H", "quantity": 1}],
             "attributes": {"objectType": "Order"}}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/checkout"):
            return httpx.Response(201, json=order)  # checkout-a-cart's new-commerce example
        return httpx.Response(200, json=_availability("K971", "commercial"))  # the availabilities example

    client, _ = make_client(handler)
    found = await client.resolve_availability("CFQ7TTC0LH18", "0001", country="US", term_duration="P1Y",
                                              billing_cycle="annual", segment="commercial")
    assert found.catalog_item_id == "CFQ7TTC0LH18:0001:K971"
    docs = await client.list_availability_documents("CFQ7TTC0LH18", "0001", "US")
    assert [d["id"] for d in docs] == ["K971"]
    result = await client.checkout_cart(CUST, "cart-1", request_id="66666666-6666-6666-6666-666666666666")
    assert [o.id for o in result.orders] == ["a68736758d9c"] and result.rejection() is None
    assert result.orders[0].line_items[0].offer_id == "CFQ7TTC0LF8S:0001:CFQ7TTC0N81H"
    # a real CartCheckoutResult is still read as one, with or without its objectType
    assert CheckoutResult.parse({"orders": [order], "orderErrors": []}).orders[0].id == "a68736758d9c"
    assert CheckoutResult.parse({"orderErrors": [{"code": 1, "description": "no"}]}).rejection() is not None


def test_the_country_falls_back_to_the_company_profile_address() -> None:
    company_only = {"id": CUST, "companyProfile": {"companyName": "C", "address": {"country": "gb"}},
                    "billingProfile": {"attributes": {"objectType": "CustomerBillingProfile"}}}
    assert Customer.parse(company_only).country == "GB"
    both = {**company_only, "billingProfile": {"defaultAddress": {"country": "US"}}}
    assert Customer.parse(both).country == "US"
    assert Customer.parse({"id": CUST}).country is None


def test_a_date_past_the_end_of_utc_is_the_far_future_placeholder() -> None:
    end = parse_datetime("9999-12-31T23:59:59-08:00")
    assert end is not None and end.year == FAR_FUTURE_YEAR and end.tzinfo is not None
    assert parse_datetime("0001-01-01T00:00:00+01:00") is None
    sub = Subscription.parse(sub_json(commitmentEndDate="9999-12-31T23:59:59.9999999-08:00"))
    assert sub.commitment_end is not None and not sub.end_date_known


@given(st.datetimes() | st.datetimes(min_value=datetime(9999, 12, 31)) | st.datetimes(max_value=datetime(1, 1, 1, 23)),
       st.integers(min_value=-23 * 60, max_value=23 * 60), st.sampled_from(["", ".1", ".1234567"]))
def test_parse_datetime_never_raises_and_keeps_every_representable_instant(value: datetime, offset_minutes: int,
                                                                          fraction: str) -> None:
    sign = "+" if offset_minutes >= 0 else "-"
    text = (value.replace(tzinfo=None, microsecond=0).isoformat() + fraction
            + f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}")
    parsed = parse_datetime(text)
    assert parsed is None or parsed.utcoffset() == timedelta(0)
    try:
        exact = datetime.fromisoformat(text[:19] + text[len(text) - 6:]).astimezone(UTC)
    except OverflowError:
        assert parsed is None or parsed.year == FAR_FUTURE_YEAR
    else:
        assert parsed is not None and parsed.replace(microsecond=0) == exact


@given(st.text(max_size=40))
def test_parse_datetime_never_raises_on_any_text(text: str) -> None:
    parse_datetime(text)
    parse_datetime(text + "-08:00")


def test_a_transition_reads_learns_example_spellings() -> None:
    post_answer = {"fromSubscriptionId": SUB, "toCatalogItemId": "P:S:A", "quantity": 2,
                   "transitionType": "transition_only",
                   "Events": [{"name": "Conversion", "status": "Started ", "timestamp": "2021-01-08T18:01:14Z"}]}
    t = Transition.parse(post_answer)
    assert not t.target_known and t.events[0].status == "Started" and not t.completed and not t.failed
    history = Transition.parse({"operationId": "op-1", "toSubscriptionId": "new-1", "Events": [
        {"name": "Conversion", "status": "Started "}, {"name": "Conversion", "status": "Completed"},
        {"name": "SeatReassignment", "status": "Started "}, {"name": "SeatReassignment", "status": " completed "}]})
    assert history.id == "op-1" and history.target_known and history.completed and not history.failed
    failed = Transition.parse({"id": "x", "events": [{"name": "Conversion", "status": "Failed "}]})
    assert failed.failed and not failed.completed


async def test_the_transition_history_under_its_example_key_names_its_source() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"transition": [
            {"operationId": "op-1", "toSubscriptionId": "new-1", "toCatalogItemId": "P:S:A",
             "Events": [{"name": "Conversion", "status": "Completed"}]}],
            "attributes": {"objectType": "Collection"}})

    client, _ = make_client(handler)
    (t,) = await client.list_transitions(CUST, SUB)
    assert t.id == "op-1" and t.from_subscription_id == SUB and t.to_subscription_id == "new-1" and t.completed


def test_subscribed_skus_keep_warning_and_suspended_units() -> None:
    sku = SubscribedSku.parse({"availableUnits": 4, "activeUnits": 5, "consumedUnits": 1, "suspendedUnits": 2,
                               "totalUnits": 5, "warningUnits": 3, "productSku": {"id": "efccb6f7", "name": "EMS"}})
    assert (sku.active_units, sku.warning_units, sku.suspended_units, sku.total_units) == (5, 3, 2, 5)


@pytest.mark.parametrize("consumed", [None, "many", -1, True, 1.5])
def test_a_subscribed_sku_without_a_whole_consumed_count_is_malformed_not_zero_holders(consumed: object) -> None:
    """consumedUnits is who holds the SKU; the suspension's gate reads it. Missing or not a count → a broken answer
    (the message is retried, the record ends failed with the reason), never "nobody holds it"."""
    raw: dict[str, object] = {"availableUnits": 0, "activeUnits": 5, "totalUnits": 5,
                              "productSku": {"id": "efccb6f7", "name": "EMS"}}
    if consumed is not None:
        raw["consumedUnits"] = consumed
    with pytest.raises(MalformedResponseError, match="consumedUnits"):
        SubscribedSku.parse(raw)
    assert SubscribedSku.parse({**raw, "consumedUnits": "3"}).consumed_units == 3


@pytest.mark.parametrize("answer", ["connection dropped", "500"])
async def test_a_checkout_whose_answer_is_lost_is_not_repeated_by_the_client(answer: str) -> None:
    """A repeat checkout may be refused (an expired cart: 404 800008) where the first one bought; only the purchase
    step knows it is a repeat, so the client hands the lost answer back instead of checking out again itself."""
    posts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request.headers["MS-RequestId"])
        if answer == "500":
            return httpx.Response(500, json={"code": 800003, "description": "Unexpected service error"})
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    client, _ = make_client(handler)
    with pytest.raises((ResponseLostError, UncertainWriteError)) as info:
        await client.checkout_cart(CUST, "cart-1", request_id=RequestAttempt.first("checkout", CUST, "cart-1"))
    assert info.value.maybe_applied or isinstance(info.value, ResponseLostError)
    assert len(posts) == 1
