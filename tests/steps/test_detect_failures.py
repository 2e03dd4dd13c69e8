"""Detection never skips a customer silently (audit finding 6, and 17's crash): a customer whose subscriptions could
not be read for a transient reason (5xx or throttling after the client's retries, a Retry-After longer than it sleeps)
is read again by a delayed re-scan naming only the customers that failed; one that keeps failing, or fails for a
permanent reason (403, 404, an answer the models cannot take), is reported with ``event=needs_attention`` and
recorded in the ledger's scan markers (``scan_failures``, which ``run`` reports). The rest of the page always goes on.

Re-scans are driven the way the queue would deliver them: ``PROVISIONING_POLL_SECONDS=0`` makes them visible at
once (``tests/steps/_world.detect`` picks them up); a Retry-After delay is delivered by hand from ``report.rescans``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from d365_migration import PartnerCenterClient
from d365_migration._exceptions import AccessDeniedError, ClientError, LedgerError, NotFoundError, ServerError
from d365_migration._messages import ScanMessage
from d365_migration._scan import is_transient
from d365_migration.steps import detect as detect_step
from d365_migration.steps.detect import SCAN_RETRIES
from d365_tooling.sandbox import SandboxServer
from tests.steps._world import CE, Tenant, detect, end_in, queued_scan_pages, service

NOW = "0"  # PROVISIONING_POLL_SECONDS: re-scans become visible at once
# After a 429 the client slows its shared limiter for min(Retry-After, max_retry_after): keep that short here.
SHORT_CEILING = {"max_retry_after": 1.0}


def subscription_reads(server: SandboxServer, customer_id: str) -> list[int]:
    """The statuses of every GET of one customer's subscription list."""
    suffix = f"/customers/{customer_id}/subscriptions"
    return [r["status"] for r in server.state.requests()
            if r["method"] == "GET" and r["path"].lower().endswith(suffix)]


def alerts(caplog: pytest.LogCaptureFixture, customer_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "event=needs_attention" in r.getMessage() and customer_id in r.getMessage()]


async def test_a_customer_answering_503_is_read_again_later_and_its_subscription_recorded(
        server: SandboxServer, storage: str) -> None:
    flaky, fine = Tenant(server.state), Tenant(server.state)
    # the client (max_attempts=2 in these tests) gives up after two 503s; the re-scan's read succeeds
    server.config.subscriptions_unavailable_customers = [flaky.customer_id]
    server.config.subscriptions_unavailable_times = 2
    async with service(server.url, storage, PROVISIONING_POLL_SECONDS=NOW) as svc:
        report = await detect(svc)
        records = {r.subscription_id.lower(): r for r in await svc.ledger.list_records()}
        failures = await svc.ledger.scan_failures()
    assert set(records) == {flaky.subscription_id, fine.subscription_id}
    assert report.retrying == [flaky.customer_id] and report.not_scanned == [] and failures == []
    assert subscription_reads(server, flaky.customer_id) == [503, 503, 200]
    assert subscription_reads(server, fine.customer_id) == [200]  # only the customer that failed is read again
    # one purchase message per record: the re-scan queues only what it recorded itself
    assert sorted(m.subscription_id for m in report.purchase_messages) == sorted(records)


async def test_a_customer_that_stays_unavailable_is_reported_after_the_bounded_re_scans(
        server: SandboxServer, storage: str, caplog: pytest.LogCaptureFixture) -> None:
    down, fine = Tenant(server.state, name="Down Ltd"), Tenant(server.state)
    server.config.subscriptions_unavailable_customers = [down.customer_id]  # every read answers 503
    async with service(server.url, storage, DRY_RUN="true", PROVISIONING_POLL_SECONDS=NOW) as svc:
        with caplog.at_level(logging.WARNING):
            report = await detect(svc)
        records = await svc.ledger.list_records()
        (failure,) = await svc.ledger.scan_failures()
    assert [r.subscription_id.lower() for r in records] == [fine.subscription_id]
    assert len(subscription_reads(server, down.customer_id)) == 2 * (1 + SCAN_RETRIES)  # bounded
    (reported,) = report.not_scanned
    assert reported.startswith(down.customer_id) and f"after {SCAN_RETRIES} re-scans" in reported and "503" in reported
    (line,) = alerts(caplog, down.customer_id)
    assert "kind=customer_not_scanned" in line and "'Down Ltd'" in line and "503" in line and "redrive=" in line
    assert [c for c, _ in failure.customers] == [down.customer_id] and "503" in failure.customers[0][1]


async def test_a_retry_after_too_long_defers_the_re_scan_by_the_service_wait(server: SandboxServer,
                                                                            storage: str) -> None:
    t = Tenant(server.state, name="Acme Ltd")
    # 429 with Retry-After: 900 (above the client's ceiling) to the first subscriptions read
    server.config.long_retry_after_s, server.config.long_retry_after_path = 900, "/subscriptions"
    async with service(server.url, storage, client_options=SHORT_CEILING) as svc:
        report = await svc.scan_page(svc.start_scan("run-ra"))
        assert await svc.ledger.list_records() == [] and report.not_scanned == []
        ((follow_up, delay),) = report.rescans
        assert delay == 900 and follow_up.retry == 1 and follow_up.customers == ((t.customer_id, "Acme Ltd"),)
        assert queued_scan_pages(storage) == []  # it waits on the queue, invisible for the 900 s
        later = await svc.scan_page(ScanMessage.parse(follow_up.to_json()))  # delivered after the wait
        again = await svc.scan_page(follow_up)  # a duplicate delivery is not scanned twice
        records = await svc.ledger.list_records()
    assert [r.subscription_id.lower() for r in records] == [t.subscription_id]
    assert [m.subscription_id for m in later.purchase_messages] == [t.subscription_id]
    assert again.customers == 0 and again.purchase_messages == []
    assert subscription_reads(server, t.customer_id) == [429, 200]


async def test_a_transient_provisioning_status_failure_re_scans_the_customer_without_re_queuing_its_others(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    hidden = server.state.add_subscription(t.customer_id, offer=CE, quantity=2, commitment_end="9999-12-31T00:00:00Z",
                                           offer_id=CE.id, offer_name=CE.name)
    with server.state.lock:
        server.state._customer(t.customer_id).subscriptions[hidden.id].provisioning_end = end_in(20)
    server.config.long_retry_after_s, server.config.long_retry_after_path = 900, "/provisioningstatus"
    async with service(server.url, storage, client_options=SHORT_CEILING) as svc:
        first = await svc.scan_page(svc.start_scan("run-ps"))
        ((follow_up, delay),) = first.rescans
        later = await svc.scan_page(follow_up)
        records = {r.subscription_id.lower() for r in await svc.ledger.list_records()}
    assert delay == 900
    # the readable subscription was recorded at once; the hidden end was not left "unknown" for good
    assert [m.subscription_id for m in first.purchase_messages] == [t.subscription_id]
    assert [m.subscription_id.lower() for m in later.purchase_messages] == [hidden.id.lower()]
    assert records == {t.subscription_id, hidden.id.lower()}


async def test_permanent_failures_are_reported_at_once_with_the_reason_and_not_re_read(
        server: SandboxServer, storage: str, caplog: pytest.LogCaptureFixture) -> None:
    forbidden, gone, fine = Tenant(server.state), Tenant(server.state), Tenant(server.state)
    server.config.subscriptions_forbidden_customers = [forbidden.customer_id]  # 403 20002
    server.config.subscriptions_missing_customers = [gone.customer_id]  # 404 60003
    async with service(server.url, storage, DRY_RUN="true", PROVISIONING_POLL_SECONDS=NOW) as svc:
        with caplog.at_level(logging.WARNING):
            report = await detect(svc)
        records = await svc.ledger.list_records()
        failures = await svc.ledger.scan_failures()
    assert [r.subscription_id.lower() for r in records] == [fine.subscription_id]
    assert report.retrying == [] and report.rescans == []
    assert subscription_reads(server, forbidden.customer_id) == [403]
    assert subscription_reads(server, gone.customer_id) == [404]
    reasons = dict(c for f in failures for c in f.customers)
    assert "20002" in reasons[forbidden.customer_id] and "60003" in reasons[gone.customer_id]
    assert "20002" in alerts(caplog, forbidden.customer_id)[0] and "60003" in alerts(caplog, gone.customer_id)[0]


async def test_an_answer_the_models_cannot_take_is_reported_and_the_page_goes_on(
        server: SandboxServer, storage: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    odd, fine = Tenant(server.state), Tenant(server.state)
    async with service(server.url, storage, DRY_RUN="true", PROVISIONING_POLL_SECONDS=NOW) as svc:
        real = svc.client.list_subscriptions

        async def list_subscriptions(customer_id: str, **kw: Any) -> Any:
            if customer_id == odd.customer_id:  # what parse_datetime did with 9999-12-31T23:59:59-08:00
                raise OverflowError("date value out of range")
            return await real(customer_id, **kw)

        monkeypatch.setattr(svc.client, "list_subscriptions", list_subscriptions)
        with caplog.at_level(logging.WARNING):
            report = await detect(svc)
        records = await svc.ledger.list_records()
        (failure,) = await svc.ledger.scan_failures()
    assert [r.subscription_id.lower() for r in records] == [fine.subscription_id]
    assert report.rescans == []  # not transient: reading again gives the same answer
    assert failure.customers[0][0] == odd.customer_id and "OverflowError" in failure.customers[0][1]
    assert "OverflowError" in alerts(caplog, odd.customer_id)[0]


async def test_a_year_9999_date_with_a_negative_offset_does_not_poison_the_page(
        server: SandboxServer, storage: str) -> None:
    odd, fine = Tenant(server.state), Tenant(server.state)
    with server.state.lock:
        server.state._customer(odd.customer_id).subscriptions[odd.subscription_id].commitment_end = (
            "9999-12-31T23:59:59-08:00")
    async with service(server.url, storage, DRY_RUN="true", PROVISIONING_POLL_SECONDS=NOW) as svc:
        report = await detect(svc)  # before the fix: OverflowError escaped the page
        records = {r.subscription_id.lower() for r in await svc.ledger.list_records()}
    assert fine.subscription_id in records
    # either the date parses (a far-future end: "end date unknown", explained) or the customer is reported
    explained = {x.subscription_id.lower() for x in report.left_alone if x.reason.startswith("end date unknown")}
    assert odd.subscription_id in explained or any(x.startswith(odd.customer_id) for x in report.not_scanned)


async def test_a_page_failing_on_its_last_delivery_is_recorded_failed(server: SandboxServer, storage: str) -> None:
    Tenant(server.state)
    server.config.apply_patch({"faults": {"error_rate": 1.0}})  # the customer page itself cannot be read
    async with service(server.url, storage) as svc:
        message = svc.start_scan("run-ld")
        with pytest.raises(Exception):  # noqa: B017 - the host retries it
            await svc.scan_page(message)
        assert await svc.ledger.scan_failures() == []  # not the last delivery: nothing reported yet
        with pytest.raises(Exception):  # noqa: B017 - the host poisons it
            await svc.scan_page(message, last_delivery=True)
        (failure,) = await svc.ledger.scan_failures()
        server.config.apply_patch({"faults": {"error_rate": 0.0}})
        redriven = await svc.scan_page(message)  # re-driven from the poison queue: a failed page is scanned again
        assert redriven.new_records == 1 and await svc.ledger.scan_failures() == []
    assert (failure.run_id, failure.page, failure.customers) == ("run-ld", 0, ())
    assert failure.reason and "ServerError" in failure.reason


async def test_a_re_scan_failing_on_its_last_delivery_records_its_customers(
        server: SandboxServer, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        follow_up = ScanMessage("run-rs", 3, None, retry=2, customers=((t.customer_id, "Tenant"),))

        async def broken(*_: Any) -> Any:
            raise LedgerError("ledger unreachable: ServiceRequestError")

        monkeypatch.setattr(detect_step, "load_controls", broken)
        with pytest.raises(LedgerError):
            await svc.scan_page(follow_up, last_delivery=True)
        (failure,) = await svc.ledger.scan_failures()
    assert (failure.run_id, failure.page) == ("run-rs", 3) and failure.part.startswith("r02-")
    assert [c for c, _ in failure.customers] == [t.customer_id] and "LedgerError" in failure.customers[0][1]


async def test_a_page_busy_elsewhere_is_looked_at_again_not_dropped(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        follow_up = ScanMessage("run-cc", 0, None, retry=1, customers=((t.customer_id, "Tenant"),))
        part = detect_step._part(follow_up)
        await svc.ledger.claim_scan_page("run-cc", 0, "another-worker", lease=detect_step.LEASE, part=part)
        busy = await svc.scan_page(follow_up)  # a duplicate delivery while another invocation scans it
        assert busy.customers == 0 and await svc.ledger.list_records() == []
        assert subscription_reads(server, t.customer_id) == []  # never scanned twice at the same time
        ((again, delay),) = busy.requeued
        assert again == follow_up and delay == detect_step.SCAN_BUSY_DELAY_SECONDS
        # that invocation dies without finishing (here: gives its claim up); the looked-again copy scans the page
        await svc.ledger.release_scan_page("run-cc", 0, "another-worker", part=part)
        later = await svc.scan_page(again)
        records = await svc.ledger.list_records()
    assert later.customers == 1 and [r.subscription_id.lower() for r in records] == [t.subscription_id]


async def test_a_failed_page_is_released_so_its_next_delivery_scans_it(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage, DRY_RUN="true") as svc, service(server.url, storage,
                                                                             DRY_RUN="true") as other:
        message = ScanMessage("run-rel", 0, None, retry=1, customers=((t.customer_id, "Tenant"),))

        async def broken(*_: Any) -> Any:
            raise LedgerError("ledger unreachable: ServiceRequestError")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(detect_step, "load_controls", broken)
            with pytest.raises(LedgerError):
                await svc.scan_page(message)  # fails; the host delivers it again, maybe to another instance
        report = await other.scan_page(message)
        records = await other.ledger.list_records()
    assert report.customers == 1 and report.requeued == []
    assert [r.subscription_id.lower() for r in records] == [t.subscription_id]


async def test_a_customer_page_answering_a_long_retry_after_is_read_again_after_it(server: SandboxServer,
                                                                                  storage: str) -> None:
    t = Tenant(server.state)
    server.config.long_retry_after_s, server.config.long_retry_after_path = 900, "/v1/customers"  # the page read
    async with service(server.url, storage, client_options=SHORT_CEILING) as svc:
        report = await svc.scan_page(svc.start_scan("run-pg"))
        ((again, delay),) = report.requeued
        assert delay == 900 and again.waits == 1 and again.page == 0
        later = await svc.scan_page(ScanMessage.parse(again.to_json()))  # delivered after the wait
        records = await svc.ledger.list_records()
    assert later.customers == 1 and [r.subscription_id.lower() for r in records] == [t.subscription_id]


async def test_a_retired_subscription_whose_end_or_renewal_is_unknown_raises_the_alert(
        server: SandboxServer, storage: str, caplog: pytest.LogCaptureFixture) -> None:
    no_end, no_renewal = Tenant(server.state), Tenant(server.state)
    with server.state.lock:
        server.state._customer(no_end.customer_id).subscriptions[no_end.subscription_id].commitment_end = (
            "9999-12-31T00:00:00Z")  # and the provisioning status endDate is the same placeholder
        server.state._customer(no_renewal.customer_id).subscriptions[no_renewal.subscription_id].auto_renew = (
            None)  # type: ignore[assignment]  # autoRenewEnabled: null
    async with service(server.url, storage, DRY_RUN="true", PROVISIONING_POLL_SECONDS=NOW) as svc:
        with caplog.at_level(logging.WARNING):
            report = await detect(svc)
        assert await svc.ledger.list_records() == []  # never bought on a guess
    assert {x.subscription_id.lower() for x in report.left_alone} == {no_end.subscription_id,
                                                                      no_renewal.subscription_id}
    (end_line,) = alerts(caplog, no_end.subscription_id)
    (renewal_line,) = alerts(caplog, no_renewal.subscription_id)
    assert "end date unknown" in end_line and "auto-renew state unknown" in renewal_line


async def test_the_sandbox_switches_answer_the_documented_errors_and_the_scan_types_them(
        server: SandboxServer) -> None:
    flaky, refused, gone = Tenant(server.state), Tenant(server.state), Tenant(server.state)
    server.config.subscriptions_unavailable_customers = [flaky.customer_id.upper()]
    server.config.subscriptions_unavailable_times = 1
    server.config.subscriptions_forbidden_customers = [refused.customer_id]
    server.config.subscriptions_missing_customers = [gone.customer_id]
    async with PartnerCenterClient(server.url, None, max_attempts=1, requests_per_minute=None,
                                   license_requests_per_minute=None) as client:
        with pytest.raises(ServerError) as unavailable:
            await client.list_subscriptions(flaky.customer_id)
        assert await client.list_subscriptions(flaky.customer_id)  # only the first N answers fail
        with pytest.raises(ClientError) as forbidden:
            await client.list_subscriptions(refused.customer_id)
        with pytest.raises(NotFoundError) as missing:
            await client.list_subscriptions(gone.customer_id)
    assert (unavailable.value.status, unavailable.value.code) == (503, "800003") and is_transient(unavailable.value)
    assert (forbidden.value.status, forbidden.value.code) == (403, "20002") and not is_transient(forbidden.value)
    assert not isinstance(forbidden.value, AccessDeniedError)  # this customer only, not the partner's token
    assert (missing.value.status, missing.value.code) == (404, "60003") and not is_transient(missing.value)


def test_a_re_scan_message_round_trips_and_stays_small() -> None:
    customers = tuple((f"{i:08d}-0000-4000-8000-000000000000", "N" * 300) for i in range(100))
    message = ScanMessage("run-1", 7, None, retry=3, customers=customers)
    body = message.to_json()
    parsed = ScanMessage.parse(body)
    assert len(body.encode()) < 48 * 1024
    assert (parsed.retry, parsed.page, len(parsed.customers)) == (3, 7, 100)
    assert parsed.customers[0] == (customers[0][0], "N" * 100)  # names are shortened, ids kept
    assert ScanMessage.parse(ScanMessage("run-1", 0, None).to_json()).customers == ()
