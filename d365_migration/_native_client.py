"""Partner Center's native migration calls (transition eligibilities, transitions, legacy upgrades) and their models.

A mixin of :class:`~d365_migration._client.PartnerCenterClient`; errors go through the client's one error table
(a refused transition is a ``ClientError`` with Partner Center's code and description).

Learn (partner-center/developer/…): ``transition-a-new-commerce-subscription`` (eligibilities with
``eligibilityType=immediate``; POST transitions; "these methods support both traditional and new commerce source
subscriptions"), ``get-transitions``, ``transition-resources`` (Transition, TransitionEvent: ``Conversion`` /
``SeatReassignment`` events with status ``InProgress`` | ``Completed`` | ``Failed``), ``transition-a-subscription``
(GET/POST ``…/upgrades``; GDAP: Directory Writers for an upgrade with license transfer) and ``upgrade-resources``
(Upgrade, UpgradeError codes, UpgradeResult with per-user ``licenseErrors``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._exceptions import MalformedResponseError
from ._models import collection_items, get_ci

if TYPE_CHECKING:
    from ._client import RequestIdLike

__all__ = [
    "NativeError",
    "Transition",
    "TransitionEvent",
    "TransitionOption",
    "UpgradeOption",
    "UpgradeResult",
    "UserLicenseError",
]

WITH_LICENSE_TRANSFER = ("transition_with_license_transfer", "upgrade_with_license_transfer")


@dataclass(frozen=True)
class NativeError:
    """One reason Partner Center gives (eligibility error, upgrade error), kept verbatim."""

    code: str
    description: str

    @classmethod
    def parse(cls, raw: Any) -> NativeError:
        code = get_ci(raw, "code") if isinstance(raw, Mapping) else None
        text = get_ci(raw, "description") if isinstance(raw, Mapping) else None
        extra = get_ci(raw, "additionalDetails") if isinstance(raw, Mapping) else None
        description = str(text or "")
        if extra:
            description = f"{description} ({extra})" if description else str(extra)
        return cls(code="" if code is None else str(code), description=description)

    def __str__(self) -> str:
        return f"{self.code}: {self.description}" if self.code else self.description


def _errors(raw: Any) -> tuple[NativeError, ...]:
    return tuple(NativeError.parse(e) for e in raw) if isinstance(raw, list) else ()


@dataclass(frozen=True)
class TransitionOption:
    """One ``TransitionEligibility`` × ``TransitionEligibilityDetail``: a catalog item and whether it can be
    reached, how (``transition_type``) and why not (``errors``)."""

    catalog_item_id: str
    title: str
    quantity: int | None
    is_eligible: bool
    transition_type: str
    errors: tuple[NativeError, ...]

    @property
    def with_license_transfer(self) -> bool:
        return self.transition_type.lower() in WITH_LICENSE_TRANSFER

    @classmethod
    def parse_all(cls, raw: Any) -> list[TransitionOption]:
        if not isinstance(raw, Mapping):
            return []
        details = get_ci(raw, "eligibilities")
        qty = get_ci(raw, "quantity")
        catalog_item_id, title = str(get_ci(raw, "catalogItemId") or ""), str(get_ci(raw, "title") or "")
        quantity = qty if isinstance(qty, int) else None
        out = []
        for d in details if isinstance(details, list) else []:
            if isinstance(d, Mapping):
                out.append(cls(catalog_item_id, title, quantity, is_eligible=get_ci(d, "isEligible") is True,
                               transition_type=str(get_ci(d, "transitionType") or ""),
                               errors=_errors(get_ci(d, "errors"))))
        return out


def _text(raw: Mapping[str, Any], key: str) -> str:
    """A string field, stripped: Learn's examples carry ``"status": "Started "`` (get-transitions)."""
    value = get_ci(raw, key)
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class TransitionEvent:
    name: str
    status: str  # stripped; Started | InProgress | Completed | Failed | anything new
    errors: tuple[NativeError, ...] = ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TransitionEvent:
        return cls(_text(raw, "name"), _text(raw, "status"), _errors(get_ci(raw, "errors")))


@dataclass(frozen=True)
class Transition:
    """A transition as Partner Center reports it (POST answer or history item).

    ``to_subscription_id`` is ``""`` while it is not known: transition-resources says it "is only populated if the
    subscription changes", so a POST answer may not carry it yet (:attr:`target_known`); read the history later."""

    id: str
    from_subscription_id: str
    to_subscription_id: str
    to_catalog_item_id: str
    transition_type: str
    status: str
    events: tuple[TransitionEvent, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, raw: Any) -> Transition:
        if not isinstance(raw, Mapping):
            raise MalformedResponseError("transition is not a JSON object", method="GET", path="transitions")
        events = get_ci(raw, "events")
        return cls(
            # get-transitions' example names it operationId
            id=_text(raw, "id") or _text(raw, "operationId"),
            from_subscription_id=_text(raw, "fromSubscriptionId"),
            to_subscription_id=_text(raw, "toSubscriptionId"),
            to_catalog_item_id=_text(raw, "toCatalogItemId"),
            transition_type=_text(raw, "transitionType"),
            status=_text(raw, "status"),
            events=tuple(TransitionEvent.parse(e) for e in (events if isinstance(events, list) else [])
                         if isinstance(e, Mapping)),
            raw=raw,
        )

    @property
    def target_known(self) -> bool:
        """Does the answer name the subscription the move goes to?"""
        return bool(self.to_subscription_id)

    def _latest_events(self) -> list[TransitionEvent]:
        """Each event's latest status: get-transitions' example lists the events as a log — ``Conversion``
        ``Started `` and later ``Conversion`` ``Completed`` — so a later entry of the same name replaces an earlier
        one (entries come in time order)."""
        latest: dict[str, TransitionEvent] = {}
        for event in self.events:
            latest.pop(event.name.lower(), None)
            latest[event.name.lower()] = event
        return list(latest.values())

    @property
    def failed(self) -> bool:
        """The transition failed, or an event's latest status is failed (an earlier failed entry followed by a
        completed one of the same name was retried and succeeded)."""
        return self.status.lower() == "failed" or any(e.status.lower() == "failed" for e in self._latest_events())

    @property
    def completed(self) -> bool:
        """Every event's latest status is completed (a transition without events counts by its status)."""
        if self.events:
            return all(e.status.lower() == "completed" for e in self._latest_events())
        return self.status.lower() in ("complete", "completed")


@dataclass(frozen=True)
class UpgradeOption:
    """One ``Upgrade`` (traditional subscriptions): the target offer, the type, eligibility and its errors."""

    target_offer_id: str
    target_offer_name: str
    upgrade_type: str
    is_eligible: bool
    quantity: int | None
    errors: tuple[NativeError, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def with_license_transfer(self) -> bool:
        return self.upgrade_type.lower() in WITH_LICENSE_TRANSFER

    @classmethod
    def parse(cls, raw: Any) -> UpgradeOption:
        if not isinstance(raw, Mapping):
            raise MalformedResponseError("upgrade is not a JSON object", method="GET", path="upgrades")
        offer = get_ci(raw, "targetOffer")
        qty = get_ci(raw, "quantity")
        return cls(
            target_offer_id=str(get_ci(offer, "id") or "") if isinstance(offer, Mapping) else "",
            target_offer_name=str(get_ci(offer, "name") or "") if isinstance(offer, Mapping) else "",
            upgrade_type=str(get_ci(raw, "upgradeType") or ""),
            is_eligible=get_ci(raw, "isEligible") is True,
            quantity=qty if isinstance(qty, int) else None,
            errors=_errors(get_ci(raw, "upgradeErrors")),
            raw=raw,
        )


@dataclass(frozen=True)
class UserLicenseError:
    user_id: str
    name: str
    email: str
    errors: tuple[NativeError, ...]

    def __str__(self) -> str:
        who = self.email or self.name or self.user_id
        return f"{who} ({self.user_id}): " + "; ".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class UpgradeResult:
    source_subscription_id: str
    target_subscription_id: str
    upgrade_type: str
    errors: tuple[NativeError, ...]
    license_errors: tuple[UserLicenseError, ...]

    @classmethod
    def parse(cls, raw: Any) -> UpgradeResult:
        if not isinstance(raw, Mapping):
            raise MalformedResponseError("upgrade result is not a JSON object", method="POST", path="upgrades")
        lic = get_ci(raw, "licenseErrors")
        return cls(
            source_subscription_id=str(get_ci(raw, "sourceSubscriptionId") or ""),
            target_subscription_id=str(get_ci(raw, "targetSubscriptionId") or ""),
            upgrade_type=str(get_ci(raw, "upgradeType") or ""),
            errors=_errors(get_ci(raw, "upgradeErrors")),
            license_errors=tuple(
                UserLicenseError(str(get_ci(e, "userObjectId") or ""), str(get_ci(e, "name") or ""),
                                 str(get_ci(e, "email") or ""), _errors(get_ci(e, "errors")))
                for e in (lic if isinstance(lic, list) else []) if isinstance(e, Mapping)),
        )


class _TransitionOps:
    """Native paths: eligibility (read-only), transitions and upgrades (writes with a :class:`RequestAttempt`)."""

    if TYPE_CHECKING:
        async def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                          json_body: Any = None, headers: Mapping[str, str] | None = None,
                          request_id: RequestIdLike | None = None, idempotent: bool = True,
                          expect_body: bool = True) -> Any: ...

        def _sub_path(self, customer_id: str, subscription_id: str) -> str: ...

    async def get_transition_options(self, customer_id: str, subscription_id: str) -> list[TransitionOption]:
        """``GET …/transitionEligibilities?eligibilityType=immediate``: every target and whether it is eligible.

        :raises PartnerCenterError: typed by the client's error table."""
        path = self._sub_path(customer_id, subscription_id) + "/transitionEligibilities"
        body = await self.request("GET", path, params={"eligibilityType": "immediate"})
        return [o for item in collection_items(body, "transition eligibilities", path)
                for o in TransitionOption.parse_all(item)]

    async def create_transition(self, customer_id: str, subscription_id: str, *, to_catalog_item_id: str,
                                quantity: int, transition_type: str, request_id: RequestIdLike) -> Transition:
        """``POST …/transitions`` (not retried blindly: after a lost answer read :meth:`list_transitions`).

        :raises ClientError: Partner Center refused the transition (code and description kept).
        :raises ResponseLostError | UncertainWriteError: the answer was lost; it may have been applied."""
        path = self._sub_path(customer_id, subscription_id) + "/transitions"
        body = {"toCatalogItemId": to_catalog_item_id, "quantity": quantity, "transitionType": transition_type}
        answer = await self.request("POST", path, json_body=body, request_id=request_id, idempotent=False)
        return Transition.parse(answer)

    async def list_transitions(self, customer_id: str, subscription_id: str) -> list[Transition]:
        """``GET …/transitions``: the subscription's transition history with its events.

        get-transitions' example lists them under ``transition`` (not ``items``) and leaves ``fromSubscriptionId``
        out: it is the history of ``subscription_id``, so a transition that names no source (and does not go to
        ``subscription_id``) is taken as one from it."""
        path = self._sub_path(customer_id, subscription_id) + "/transitions"
        body = await self.request("GET", path)
        out = []
        for item in collection_items(body, "transitions", path, item_keys=("transition", "transitions")):
            t = Transition.parse(item)
            if not t.from_subscription_id and t.to_subscription_id.lower() != subscription_id.strip().lower():
                t = dataclasses.replace(t, from_subscription_id=subscription_id.strip())
            out.append(t)
        return out

    async def get_upgrade_options(self, customer_id: str, subscription_id: str) -> list[UpgradeOption]:
        """``GET …/upgrades`` (traditional subscriptions)."""
        path = self._sub_path(customer_id, subscription_id) + "/upgrades"
        return [UpgradeOption.parse(i) for i in collection_items(await self.request("GET", path), "upgrades", path)]

    async def create_upgrade(self, customer_id: str, subscription_id: str, option: UpgradeOption, *,
                             request_id: RequestIdLike) -> UpgradeResult:
        """``POST …/upgrades`` with the chosen Upgrade (as Partner Center listed it). The result's ``errors`` mean
        nothing happened; ``license_errors`` name the users whose licenses did not move.

        :raises ResponseLostError | UncertainWriteError: the answer was lost; read the subscriptions to find out."""
        path = self._sub_path(customer_id, subscription_id) + "/upgrades"
        body = dict(option.raw)
        answer = await self.request("POST", path, json_body=body, request_id=request_id, idempotent=False)
        return UpgradeResult.parse(answer)
