"""Partner Center's native migration paths: transition eligibilities, transitions and (legacy) upgrades.

Documented resources (Microsoft Learn, partner-center/developer/…):

* ``transition-a-new-commerce-subscription``: ``GET …/subscriptions/{s}/transitionEligibilities?eligibilityType=
  immediate`` lists :class:`TransitionEligibility` items (``catalogItemId``, ``title``, ``quantity``,
  ``eligibilities[{isEligible, transitionType, errors[{code, description}]}]``); ``POST …/subscriptions/{s}/
  transitions`` performs one. "These methods support both traditional and new commerce source subscriptions."
* ``transition-resources`` / SDK ``Transition`` and ``TransitionEvent``: a transition carries ``fromCatalogItemId``,
  ``fromSubscriptionId``, ``toCatalogItemId``, ``toSubscriptionId``, ``quantity``, ``termDuration``,
  ``billingCycle``, ``transitionType`` and ``events[{name: Conversion|SeatReassignment, status: InProgress|Completed|
  Failed, timestamp, errors}]``. ``get-transitions``: ``GET …/subscriptions/{s}/transitions`` is the history.
* ``transition-a-subscription`` / ``upgrade-resources`` (traditional only): ``GET …/subscriptions/{s}/upgrades`` lists
  ``Upgrade{targetOffer, upgradeType: none|upgrade_only|upgrade_with_license_transfer, isEligible, quantity,
  upgradeErrors[{code, description, additionalDetails}]}``; ``POST …/upgrades`` with the chosen Upgrade answers an
  ``UpgradeResult{sourceSubscriptionId, targetSubscriptionId, upgradeType, upgradeErrors, licenseErrors[
  UserLicenseError{userObjectId, name, email, errors}]}``. UpgradeError codes: ``other``,
  ``delegated_admin_permissions_disabled``, ``subscription_status_not_active``, ``conflicting_service_types``,
  ``concurrency_conflicts``, ``user_context_required``, ``subscription_add_ons_present``,
  ``subscription_does_not_have_any_upgrade_paths``, ``subscription_target_offer_not_found``,
  ``subscription_not_provisioned``.
* SDK ``TransitionErrorCode``: 0 Other, 1 DelegatedAdminPermissionsDisabled, 2 SubscriptionStatusNotActive, …,
  7 SubscriptionDoesNotHaveAnyTransitionedPaths (numeric ``code`` in transition eligibility errors).

Which native path a retired Qualified Offer has is not documented (reference §NCE migration, [UNCLEAR]), so the
sandbox's default is none; ``SandboxConfig.native_paths`` (customer id → mode) switches a customer's retired
subscriptions to one of :data:`NATIVE_MODES`. ``native_license_error_users`` (user ids) fail their seat
reassignment (``licenseErrors`` / a Failed SeatReassignment event), ``native_completion_s`` delays completion (the
transition shows ``InProgress`` events until then), ``native_source_left_active`` leaves the old subscription active
after a completed move (the tool must suspend it).
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._catalog import DEMO_REPLACEMENT_OFFERS, LEGACY_REPLACEMENT_OFFERS, CatalogItem, catalog_item
from ._state import ApiError, Customer, SandboxState, Subscription, ci_get, iso, iso_day, link

__all__ = ["NATIVE_MODES", "NativeOperation", "native_operations", "transition_routes"]

JSON_CT = "application/json; charset=utf-8"
#: What Partner Center offers a customer's retired subscriptions (``SandboxConfig.native_paths`` values).
NATIVE_MODES = ("none", "transition_with_license_transfer", "transition_only", "upgrade_with_license_transfer",
                "upgrade_only")
_NO_TRANSITION = (7, "The transition cannot be performed because the source subscription does not have any "
                     "transition paths.")
_NOT_ACTIVE = (2, "The transition cannot be performed because the subscription status is suspended or cancelled.")


@dataclass
class NativeOperation:
    """One transition or upgrade the sandbox performed (test-facing read: :func:`native_operations`)."""

    kind: str  # "transition" | "upgrade"
    id: str
    customer_id: str
    from_subscription_id: str
    from_catalog_item_id: str
    to_catalog_item_id: str
    to_subscription_id: str
    quantity: int
    transition_type: str
    created: float
    complete_at: float
    request_id: str = ""
    completed: bool = False
    moved_users: list[str] = field(default_factory=list)
    failed_users: list[dict[str, Any]] = field(default_factory=list)

    def learn_example_json(self, now: float) -> dict[str, Any]:
        """As get-transitions' example shows a history item: ``operationId`` (no ``id``), no
        ``fromSubscriptionId``, and the events as a log — each one ``"Started "`` (the trailing space as printed)
        and, once it ended, a second entry of the same name with its outcome."""
        out = self.to_json(now)
        out["operationId"] = out.pop("id")
        out.pop("fromSubscriptionId")
        log: list[dict[str, Any]] = []
        for event in out.pop("events"):
            log.append({**event, "status": "Started ", "timestamp": iso(self.created), "errors": [],
                        "attributes": {"objectType": "TransitionEvent"}})
            if event["status"] != "InProgress":
                log.append({**event, "attributes": {"objectType": "TransitionEvent"}})
        out["Events"] = log
        return out

    def to_json(self, now: float) -> dict[str, Any]:
        done = self.completed
        conversion: dict[str, Any] = {"name": "Conversion", "status": "Completed" if done else "InProgress",
                      "timestamp": iso(self.created), "errors": []}
        events = [conversion]
        if self.transition_type.endswith("with_license_transfer"):
            failed = done and bool(self.failed_users)
            events.append({
                "name": "SeatReassignment",
                "status": ("Failed" if failed else "Completed") if done else "InProgress",
                "timestamp": iso(self.complete_at if done else now),
                "errors": [{"code": 0, "description": f"License transfer failed for user {u['userObjectId']}"}
                           for u in self.failed_users] if done else [],
            })
        return {
            "id": self.id,
            "fromCatalogItemId": self.from_catalog_item_id,
            "fromSubscriptionId": self.from_subscription_id,
            "toCatalogItemId": self.to_catalog_item_id,
            "toSubscriptionId": self.to_subscription_id,
            "quantity": self.quantity,
            "termDuration": "P1Y",
            "billingCycle": "monthly",
            "transitionType": self.transition_type,
            "status": "Complete" if done else "Pending",
            "creationDate": iso(self.created),
            "events": events,
            "attributes": {"objectType": "Transition"},
        }


def _ops(state: SandboxState) -> list[NativeOperation]:
    ops: list[NativeOperation] = state.native_ops
    return ops


def native_operations(state: SandboxState) -> list[dict[str, Any]]:
    """Every transition/upgrade performed (test-facing), after completing the due ones."""
    _complete_due(state)
    with state.lock:
        return [copy.deepcopy(vars(op)) for op in _ops(state)]


def _mode(state: SandboxState, customer_id: str) -> str:
    paths = {str(k).lower(): str(v) for k, v in (state.config.native_paths or {}).items()}
    mode = paths.get(customer_id.lower(), "none")
    return mode if mode in NATIVE_MODES else "none"


def _target(source: CatalogItem | None, kind: str) -> CatalogItem | None:
    """The replacement a retired Qualified Offer moves to: the new-commerce item (transition) or the legacy offer
    (upgrade) of the same family and audience."""
    if source is None or source.role != "retired" or not source.family or not source.audience:
        return None
    table = DEMO_REPLACEMENT_OFFERS if kind == "transition" else LEGACY_REPLACEMENT_OFFERS
    return catalog_item(table[source.family][source.audience])


def _current_catalog_id(state: SandboxState, item: CatalogItem) -> str:
    if not item.is_nce:
        return item.id
    product, sku, base = item.id.split(":")
    return f"{product}:{sku}:{state.availability_id(product, sku, base)}"


def _source(state: SandboxState, customer_id: str, subscription_id: str) -> tuple[Customer, Subscription]:
    c = state._customer(customer_id)
    return c, state._sub(c, subscription_id)


def _complete_due(state: SandboxState) -> None:
    with state.lock:
        now = state.clock()
        for op in _ops(state):
            if not op.completed and op.complete_at <= now:
                _complete(state, op)


def _complete(state: SandboxState, op: NativeOperation) -> None:
    """Apply the move: the new subscription becomes active, licenses move (except the failing users), the old
    subscription is suspended (unless ``native_source_left_active``)."""
    c = state._customer(op.customer_id)
    old = c.subscriptions[op.from_subscription_id.lower()]
    new = c.subscriptions[op.to_subscription_id.lower()]
    new.status = "active"
    new.etag_version += 1
    if op.transition_type.endswith("with_license_transfer"):
        failing = {str(u).lower() for u in state.config.native_license_error_users or []}
        for user in c.users.values():
            if old.sku_id not in user.skus:
                continue
            if user.id.lower() in failing:
                op.failed_users.append({"userObjectId": user.id, "name": user.display_name,
                                        "email": user.user_principal_name,
                                        "errors": [{"code": "other", "description": "The license could not be "
                                                    "transferred to the target subscription for this user."}]})
                continue
            user.skus = [s for s in user.skus if s != old.sku_id] + ([new.sku_id] if new.sku_id not in user.skus
                                                                     else [])
            op.moved_users.append(user.id)
    if not state.config.native_source_left_active and not op.failed_users:
        old.status = "suspended"
        old.etag_version += 1
    op.completed = True
    state._event(f"native_{op.kind}_completed", customer_id=c.id, from_subscription_id=old.id,
                 to_subscription_id=new.id, moved_users=list(op.moved_users),
                 failed_users=[u["userObjectId"] for u in op.failed_users])


def _start(state: SandboxState, c: Customer, old: Subscription, target: CatalogItem, *, kind: str,
           transition_type: str, quantity: int, request_id: str) -> NativeOperation:
    now = state.clock()
    new_id = str(uuid.uuid4())
    sub = state.add_subscription(
        c.id, offer=target, subscription_id=new_id, quantity=quantity, status="pending",
        auto_renew=target.is_nce, commitment_end=iso_day(datetime.fromtimestamp(now, tz=UTC) + timedelta(days=365)),
        friendly_name=target.name, creation=now, billing_cycle="monthly" if target.is_nce else "annual",
        offer_id=_current_catalog_id(state, target),
    )
    sub.provisioned_at = now
    sub.listed_at = now
    delay = max(0.0, float(state.config.native_completion_s))
    op = NativeOperation(kind=kind, id=str(uuid.uuid4()), customer_id=c.id, from_subscription_id=old.id,
                         from_catalog_item_id=old.offer_id, to_catalog_item_id=sub.offer_id,
                         to_subscription_id=sub.id, quantity=quantity, transition_type=transition_type,
                         created=now, complete_at=now + delay, request_id=request_id)
    _ops(state).append(op)
    state._event(f"native_{kind}_started", customer_id=c.id, from_subscription_id=old.id,
                 to_subscription_id=sub.id, transition_type=transition_type)
    if delay == 0:
        _complete(state, op)
    return op


# ---------------------------------------------------------------------- transitions


def _eligibilities(state: SandboxState, customer_id: str, subscription_id: str) -> list[dict[str, Any]]:
    _, old = _source(state, customer_id, subscription_id)
    source = catalog_item(old.offer_id)
    target = _target(source, "transition")
    if target is None:
        return []
    mode = _mode(state, customer_id)
    errors: list[tuple[int, str]] = []
    transition_type = mode if mode.startswith("transition") else "transition_only"
    if old.status != "active":
        errors.append(_NOT_ACTIVE)
    if not mode.startswith("transition"):
        errors.append(_NO_TRANSITION)
    return [{
        "catalogItemId": _current_catalog_id(state, target),
        "title": target.name,
        "description": target.name,
        "quantity": old.quantity,
        "eligibilities": [{"isEligible": not errors, "transitionType": transition_type,
                           "errors": [{"code": code, "description": text} for code, text in errors]}],
        "subscriptionEligibilities": [],
    }]


def _create_transition(state: SandboxState, customer_id: str, subscription_id: str, body: Any,
                       request_id: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, 800002, "Invalid request input: the body must be a Transition object.")
    to_item = ci_get(body, "toCatalogItemId")
    wanted_type = str(ci_get(body, "transitionType") or "")
    quantity = ci_get(body, "quantity")
    if not isinstance(to_item, str) or not to_item.strip():
        raise ApiError(400, 800002, "Invalid request input: toCatalogItemId is required.")
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
        raise ApiError(400, 800002, "Invalid request input: quantity must be a positive integer.")
    with state.lock:
        c, old = _source(state, customer_id, subscription_id)
        for op in _ops(state):  # one transition per source subscription
            if op.from_subscription_id.lower() == old.id.lower():
                raise ApiError(400, 800002, f"Subscription {old.id} has already been transitioned "
                               f"(transition {op.id}).")
        offered = _eligibilities(state, customer_id, subscription_id)
        match = next((e for e in offered if str(e["catalogItemId"]).lower() == to_item.strip().lower()), None)
        if match is None:
            raise ApiError(400, 800002, f"The transition cannot be performed: {to_item} is not an eligible "
                           "transition target for this subscription.")
        detail = match["eligibilities"][0]
        if not detail["isEligible"] or (wanted_type and wanted_type != detail["transitionType"]):
            reasons = "; ".join(e["description"] for e in detail["errors"]) or (
                f"transition type {wanted_type} is not offered (offered: {detail['transitionType']})")
            raise ApiError(400, 800002, f"The transition cannot be performed: {reasons}",
                           [{"code": e["code"], "description": e["description"]} for e in detail["errors"]])
        target = catalog_item(to_item.strip()) or state.resolve_item(to_item.strip())[0]
        assert target is not None
        op = _start(state, c, old, target, kind="transition", transition_type=detail["transitionType"],
                    quantity=quantity, request_id=request_id)
        answer = op.to_json(state.clock())
        if state.config.transition_answer_without_target:
            # transition-resources: ToSubscriptionId "is only populated if the subscription changes"
            answer.pop("toSubscriptionId")
        return answer


# ---------------------------------------------------------------------- upgrades (traditional)


def _upgrades(state: SandboxState, customer_id: str, subscription_id: str) -> list[dict[str, Any]]:
    _, old = _source(state, customer_id, subscription_id)
    target = _target(catalog_item(old.offer_id), "upgrade")
    if target is None:
        return []
    mode = _mode(state, customer_id)
    errors: list[dict[str, Any]] = []
    if old.status != "active":
        errors.append({"code": "subscription_status_not_active", "description": "The subscription is not active.",
                       "additionalDetails": f"status: {old.status}"})
    if not mode.startswith("upgrade"):
        errors.append({"code": "subscription_does_not_have_any_upgrade_paths",
                       "description": "The subscription does not have any upgrade paths.", "additionalDetails": ""})
    return [{
        "targetOffer": {"id": target.id, "name": target.name, "isAvailableForPurchase": True,
                        "attributes": {"objectType": "Offer"}},
        "upgradeType": (mode if mode.startswith("upgrade") else "none") if not errors else "none",
        "isEligible": not errors,
        "quantity": old.quantity,
        "upgradeErrors": errors,
        "attributes": {"objectType": "Upgrade"},
    }]


def _create_upgrade(state: SandboxState, customer_id: str, subscription_id: str, body: Any,
                    request_id: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, 800002, "Invalid request input: the body must be an Upgrade object.")
    target_offer = ci_get(body, "targetOffer")
    target_id = ci_get(target_offer, "id") if isinstance(target_offer, dict) else None
    wanted_type = str(ci_get(body, "upgradeType") or "")
    with state.lock:
        c, old = _source(state, customer_id, subscription_id)
        offered = _upgrades(state, customer_id, subscription_id)
        match = next((u for u in offered if isinstance(target_id, str)
                      and u["targetOffer"]["id"].lower() == target_id.strip().lower()), None)
        result: dict[str, Any] = {"sourceSubscriptionId": old.id, "targetSubscriptionId": None,
                                  "upgradeType": wanted_type or "none", "upgradeErrors": [], "licenseErrors": [],
                                  "attributes": {"objectType": "UpgradeResult"}}
        if match is None:
            result["upgradeErrors"] = [{"code": "subscription_target_offer_not_found",
                                        "description": "The target offer was not found.",
                                        "additionalDetails": str(target_id)}]
            return result
        if not match["isEligible"]:
            result["upgradeErrors"] = match["upgradeErrors"]
            return result
        quantity = ci_get(body, "quantity")
        qty = quantity if isinstance(quantity, int) and not isinstance(quantity, bool) and quantity > 0 \
            else old.quantity
        target = catalog_item(match["targetOffer"]["id"])
        assert target is not None
        op = _start(state, c, old, target, kind="upgrade", transition_type=match["upgradeType"], quantity=qty,
                    request_id=request_id)
        result["targetSubscriptionId"] = op.to_subscription_id
        result["upgradeType"] = op.transition_type
        result["licenseErrors"] = copy.deepcopy(op.failed_users)
        return result


# ---------------------------------------------------------------------- routes


def _json(status: int, obj: Any) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type=JSON_CT)


def _collection(items: list[dict[str, Any]], self_uri: str) -> dict[str, Any]:
    return {"totalCount": len(items), "items": items, "links": {"self": link(self_uri)},
            "attributes": {"objectType": "Collection"}}


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, 800002, "Invalid request input: the body is not valid JSON.") from None


def transition_routes(state: SandboxState) -> list[Route]:
    """The native-path routes under ``/v1/customers/{cid}/subscriptions/{sid}/``."""

    if _complete_due not in state.tick_hooks:
        state.tick_hooks.append(_complete_due)

    def ids(request: Request) -> tuple[str, str]:
        return str(request.path_params["cid"]), str(request.path_params["sid"])

    def guarded(fn: Any) -> Any:
        async def wrapper(request: Request) -> Response:
            try:
                state.tick()
                status, obj = await fn(request)
                return _json(status, obj)
            except ApiError as err:
                return _json(err.status, err.body())
        return wrapper

    async def eligibilities(request: Request) -> tuple[int, Any]:
        cid, sid = ids(request)
        q = {k.lower(): v for k, v in request.query_params.items()}
        kind = (q.get("eligibilitytype") or "").strip().lower()
        if kind not in ("immediate", "scheduled"):
            raise ApiError(400, 800002, "Invalid request input: eligibilityType must be immediate or scheduled.")
        with state.lock:
            items = _eligibilities(state, cid, sid) if kind == "immediate" else []
        return 200, _collection(items, f"/customers/{cid}/subscriptions/{sid}/transitionEligibilities")

    async def transitions(request: Request) -> tuple[int, Any]:
        cid, sid = ids(request)
        if request.method == "POST":
            rid = request.headers.get("ms-requestid", "")
            return 200, _create_transition(state, cid, sid, await _body(request), rid)
        with state.lock:
            _source(state, cid, sid)
            now = state.clock()
            ops = [op for op in _ops(state) if op.kind == "transition" and op.customer_id.lower() == cid.lower()
                   and sid.lower() in (op.from_subscription_id.lower(), op.to_subscription_id.lower())]
            if state.config.transition_history_as_learn_example:
                return 200, {"transition": [op.learn_example_json(now) for op in ops],
                             "attributes": {"objectType": "Collection"}}
            items = [op.to_json(now) for op in ops]
        return 200, _collection(items, f"/customers/{cid}/subscriptions/{sid}/transitions")

    async def upgrades(request: Request) -> tuple[int, Any]:
        cid, sid = ids(request)
        if request.method == "POST":
            rid = request.headers.get("ms-requestid", "")
            return 200, _create_upgrade(state, cid, sid, await _body(request), rid)
        with state.lock:
            items = _upgrades(state, cid, sid)
        return 200, _collection(items, f"/customers/{cid}/subscriptions/{sid}/upgrades")

    base = "/v1/customers/{cid}/subscriptions/{sid}"
    return [
        # The outer app lower-cases the path (Partner Center matches routes case-insensitively).
        Route(f"{base}/transitioneligibilities", guarded(eligibilities), methods=["GET"]),
        Route(f"{base}/transitions", guarded(transitions), methods=["GET", "POST"]),
        Route(f"{base}/upgrades", guarded(upgrades), methods=["GET", "POST"]),
    ]
