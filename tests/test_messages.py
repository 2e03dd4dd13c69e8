"""Queue message schema: round trip, and every malformed message is rejected with a reason (never crashes)."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d365_migration import InvalidMessageError, StepMessage

C, S, K = (str(uuid.uuid4()) for _ in range(3))


def test_round_trip() -> None:
    m = StepMessage("purchase", C, S, K, poll=3)
    assert StepMessage.parse(m.to_json(), expected_step="purchase") == m
    assert m.queue == "purchase-new"
    assert m.next_poll().poll == 4


def test_ids_keep_the_case_partner_center_used() -> None:
    m = StepMessage("reassign", C.upper(), S.upper(), K)
    assert StepMessage.parse(m.to_json(), expected_step="reassign").customer_id == C.upper()


@pytest.mark.parametrize("body,fragment", [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1,2]", "not a JSON object"),
    (json.dumps({"schemaVersion": 2, "step": "purchase"}).encode(), "schemaVersion"),
    (json.dumps({"schemaVersion": 1, "step": "suspend", "customerId": C, "subscriptionId": S,
                 "correlationId": K}).encode(), "arrived on the purchase queue"),
    (json.dumps({"schemaVersion": 1, "step": "purchase", "customerId": "contoso", "subscriptionId": S,
                 "correlationId": K}).encode(), "customerId must be a GUID"),
    (json.dumps({"schemaVersion": 1, "step": "purchase", "customerId": C, "correlationId": K}).encode(),
     "subscriptionId"),
    (json.dumps({"schemaVersion": 1, "step": "purchase", "customerId": C, "subscriptionId": S,
                 "correlationId": K, "poll": "1"}).encode(), "poll"),
    (json.dumps({"schemaVersion": True, "step": "purchase"}).encode(), "schemaVersion"),
    (b"{" + b" " * 50_000 + b"}", "limit"),
])
def test_malformed_messages_are_rejected_with_the_reason(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        StepMessage.parse(body, expected_step="purchase")
    assert fragment in str(info.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=10)


@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_parser_only_ever_raises_invalid_message(body: bytes) -> None:
    with contextlib.suppress(InvalidMessageError):
        StepMessage.parse(body, expected_step="purchase")


@given(st.dictionaries(st.sampled_from(["schemaVersion", "step", "customerId", "subscriptionId", "correlationId",
                                        "poll", "extra"]),
                       st.one_of(st.just(1), st.just("purchase"), st.just(C), st.integers(), st.text(max_size=5),
                                 st.none())))
def test_partial_messages_never_crash(data: dict[str, object]) -> None:
    try:
        m = StepMessage.parse(json.dumps(data), expected_step="purchase")
    except InvalidMessageError:
        return
    assert m.customer_id.lower() == C and m.subscription_id.lower() == C and m.correlation_id.lower() == C


def test_scan_message_round_trip_and_rejections() -> None:
    from d365_migration._messages import ScanMessage

    m = ScanMessage("20261125T060000-abc123", 3, {"path": "/v1/customers", "params": [["size", "500"]],
                                                  "headers": [["MS-ContinuationToken", "T"]]})
    assert ScanMessage.parse(m.to_json()) == m
    for bad, fragment in [
        ({"schemaVersion": 1, "step": "purchase", "runId": "r", "page": 0}, "scan queue"),
        ({"schemaVersion": 1, "step": "scan", "runId": "r x/..", "page": 0}, "runId"),
        ({"schemaVersion": 1, "step": "scan", "runId": "r", "page": -1}, "page"),
        ({"schemaVersion": 1, "step": "scan", "runId": "r", "page": 0, "cursor": "x"}, "cursor"),
    ]:
        with pytest.raises(InvalidMessageError) as info:
            ScanMessage.parse(json.dumps(bad))
        assert fragment in str(info.value)


def test_page_cursor_from_a_message_cannot_redirect_the_client() -> None:
    from d365_migration._client import PageRequest

    for bad in [{"path": "/v1/customers/../partner"}, {"path": "https://evil.example/v1/customers"},
                {"path": "/v1/customers", "headers": [["Authorization", "Bearer x"]]}, ["not", "a", "dict"]]:
        with pytest.raises(ValueError):
            PageRequest.from_json(bad)
    ok = PageRequest.from_json({"path": "/v1/customers", "params": [["size", "5"]]})
    assert ok.params == (("size", "5"),)
