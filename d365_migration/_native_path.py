"""Which path a migration takes: Partner Center's native move (transition or upgrade with license transfer) or the
three-step runbook (buy, move every license, suspend), decided per subscription by asking Partner Center.

Whether a retired Qualified Offer has a native path is not documented; only the eligibility calls can tell
(``transition-a-new-commerce-subscription``: ``GET …/transitionEligibilities?eligibilityType=immediate``, which
accepts traditional source subscriptions too; ``transition-a-subscription``: ``GET …/upgrades`` for legacy → legacy).
A native path counts only when it moves the licenses (``transition_with_license_transfer`` /
``upgrade_with_license_transfer``) and lands on the product the partner configured in ``REPLACEMENT_OFFERS``: a
``transition_only`` would leave every user on the old SKU, which the runbook never does.

``MIGRATION_PATH_POLICY``:

* ``runbook_only`` (the default — the safe reading: the path this tool has always taken and that the partner
  approved; no native write happens unless the partner opts in; ``plan`` still shows what Partner Center offers),
* ``prefer_native``: the native path where Partner Center offers one, else the runbook,
* ``native_only``: the native path, else the migration is blocked with Partner Center's reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ._context import log_prefix
from ._exceptions import PartnerCenterApiError

if TYPE_CHECKING:
    from ._client import PartnerCenterClient
    from ._models import Subscription
    from ._native_client import TransitionOption, UpgradeOption
    from ._settings import ReplacementTarget

__all__ = ["MIGRATION_PATH_POLICIES", "PathChoice", "PathPolicy", "choose_path", "parse_path_policy"]

logger = logging.getLogger("d365_migration.native_path")

PathPolicy = Literal["prefer_native", "runbook_only", "native_only"]
PathKind = Literal["native_transition", "native_upgrade", "runbook", "blocked"]
MIGRATION_PATH_POLICIES: tuple[PathPolicy, ...] = ("prefer_native", "runbook_only", "native_only")
DEFAULT_PATH_POLICY: PathPolicy = "runbook_only"


def parse_path_policy(raw: str | None) -> PathPolicy:
    """:raises ValueError: not one of :data:`MIGRATION_PATH_POLICIES` (the message names the accepted values)."""
    text = (raw or DEFAULT_PATH_POLICY).strip().lower().replace("-", "_")
    for policy in MIGRATION_PATH_POLICIES:
        if text == policy:
            return policy
    raise ValueError(f"{raw!r} is not a migration path policy; use one of {', '.join(MIGRATION_PATH_POLICIES)}")


@dataclass(frozen=True)
class PathChoice:
    """The path for one migration and why. ``target_catalog_item_id`` / ``upgrade`` say what the native call needs."""

    kind: PathKind
    reason: str
    transition: TransitionOption | None = None
    upgrade: UpgradeOption | None = None

    @property
    def native(self) -> bool:
        return self.kind in ("native_transition", "native_upgrade")

    @property
    def label(self) -> str:
        return {"native_transition": "native transition", "native_upgrade": "native upgrade",
                "runbook": "three-step runbook", "blocked": "blocked"}[self.kind]


def _matches_target(catalog_item_id: str, target: ReplacementTarget) -> bool:
    """The eligible item is the configured product SKU (any availability) or the configured legacy offer."""
    key = target.product_key
    item = catalog_item_id.strip().lower()
    return item == key or item.startswith(key + ":")


async def choose_path(client: PartnerCenterClient, customer_id: str, subscription: Subscription,
                      target: ReplacementTarget, *, policy: PathPolicy) -> PathChoice:
    """Ask Partner Center (read-only) and choose. Eligibility errors are kept verbatim in ``reason``; an eligibility
    call that fails counts as "no native path" (its error is the reason) — never as permission to move natively."""
    if policy == "runbook_only":
        return PathChoice("runbook", "MIGRATION_PATH_POLICY=runbook_only")
    reasons: list[str] = []
    try:
        options = await client.get_transition_options(customer_id, subscription.id)
    except PartnerCenterApiError as exc:
        options = []
        reasons.append(f"transition eligibility unavailable: HTTP {exc.status} {exc.code or ''} {exc.description}")
    wanted = [o for o in options if _matches_target(o.catalog_item_id, target)]
    for option in wanted:
        if option.is_eligible and option.with_license_transfer:
            return PathChoice("native_transition", f"eligible: {option.transition_type} to "
                              f"{option.catalog_item_id}", transition=option)
    for option in wanted:
        if option.is_eligible:
            reasons.append(f"transition to {option.catalog_item_id} is {option.transition_type} (licenses would "
                           "not move)")
        else:
            reasons.append(f"transition to {option.catalog_item_id}: " + (
                "; ".join(str(e) for e in option.errors) or "not eligible"))
    if not wanted:
        reasons.append("no transition to the configured replacement is offered")
    if target.kind == "legacy":
        try:
            upgrades = await client.get_upgrade_options(customer_id, subscription.id)
        except PartnerCenterApiError as exc:
            upgrades = []
            reasons.append(f"upgrades unavailable: HTTP {exc.status} {exc.code or ''} {exc.description}")
        chosen = [u for u in upgrades if _matches_target(u.target_offer_id, target)]
        for upgrade in chosen:
            if upgrade.is_eligible and upgrade.with_license_transfer:
                return PathChoice("native_upgrade", f"eligible: {upgrade.upgrade_type} to {upgrade.target_offer_id}",
                                  upgrade=upgrade)
        for upgrade in chosen:
            reasons.append(f"upgrade to {upgrade.target_offer_id}: " + (
                "; ".join(str(e) for e in upgrade.errors) or f"{upgrade.upgrade_type} (licenses would not move)"))
        if not chosen:
            reasons.append("no upgrade to the configured replacement is offered")
    why = " | ".join(reasons)
    logger.info("%sevent=native_path_unavailable subscription=%s policy=%s %s", log_prefix(), subscription.id,
                policy, why[:500])
    if policy == "native_only":
        return PathChoice("blocked", f"MIGRATION_PATH_POLICY=native_only and no native path: {why}")
    return PathChoice("runbook", f"no native path: {why}")
