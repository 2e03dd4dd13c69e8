"""Path choice per migration (MIGRATION_PATH_POLICY) against the sandbox's eligibility outcomes."""

from __future__ import annotations

from typing import Any

import pytest

from d365_migration import PartnerCenterClient
from d365_migration._exceptions import ConfigurationError
from d365_migration._native_path import choose_path, parse_path_policy
from d365_migration._settings import ReplacementTarget, Settings
from d365_tooling.sandbox import LEGACY_REPLACEMENT_OFFERS, SandboxServer


def _client(sandbox: SandboxServer) -> PartnerCenterClient:
    return PartnerCenterClient(sandbox.url, None, requests_per_minute=None, license_requests_per_minute=None,
                               max_attempts=2, backoff_base=0.0)


async def _choose(sandbox: SandboxServer, m: Any, policy: str, *, legacy: bool = False) -> Any:
    target = ReplacementTarget.parse(LEGACY_REPLACEMENT_OFFERS[m.family][m.audience] if legacy
                                     else ":".join(m.replacement_catalog_item_id.split(":")[:2]))
    async with _client(sandbox) as client:
        sub = await client.get_subscription(m.customer_id, m.subscription_id)
        return await choose_path(client, m.customer_id, sub, target, policy=parse_path_policy(policy))


def test_policy_setting_defaults_to_runbook_only_and_rejects_typos() -> None:
    assert Settings.from_env({}).migration_path_policy == "runbook_only"
    assert Settings.from_env({"MIGRATION_PATH_POLICY": "Prefer-Native"}).migration_path_policy == "prefer_native"
    with pytest.raises(ConfigurationError, match="MIGRATION_PATH_POLICY"):
        Settings.from_env({"MIGRATION_PATH_POLICY": "native"})


async def test_runbook_only_asks_nothing(sandbox: SandboxServer) -> None:
    m = sandbox.manifest.expected[0]
    sandbox.config.native_paths = {m.customer_id: "transition_with_license_transfer"}
    before = len(sandbox.state.requests())
    choice = await _choose(sandbox, m, "runbook_only")
    assert choice.kind == "runbook"
    assert not [r for r in sandbox.state.requests()[before:] if "transition" in r["path"].lower()]


async def test_eligible_with_license_transfer_is_a_native_transition(sandbox: SandboxServer) -> None:
    m = sandbox.manifest.expected[0]
    sandbox.config.native_paths = {m.customer_id: "transition_with_license_transfer"}
    choice = await _choose(sandbox, m, "prefer_native")
    assert choice.kind == "native_transition" and choice.transition is not None


async def test_eligible_without_license_transfer_takes_the_runbook(sandbox: SandboxServer) -> None:
    m = sandbox.manifest.expected[0]
    sandbox.config.native_paths = {m.customer_id: "transition_only"}
    choice = await _choose(sandbox, m, "prefer_native")
    assert choice.kind == "runbook" and "transition_only" in choice.reason


async def test_not_eligible_gives_the_errors_verbatim_and_native_only_blocks(sandbox: SandboxServer) -> None:
    m = sandbox.manifest.expected[0]
    runbook = await _choose(sandbox, m, "prefer_native")
    blocked = await _choose(sandbox, m, "native_only")
    assert runbook.kind == "runbook" and "does not have any transition paths" in runbook.reason
    assert blocked.kind == "blocked" and "does not have any transition paths" in blocked.reason


async def test_legacy_target_with_upgrade_path_is_a_native_upgrade(sandbox: SandboxServer) -> None:
    m = sandbox.manifest.expected[0]
    sandbox.config.native_paths = {m.customer_id: "upgrade_with_license_transfer"}
    choice = await _choose(sandbox, m, "prefer_native", legacy=True)
    assert choice.kind == "native_upgrade" and choice.upgrade is not None
    sandbox.config.native_paths = {m.customer_id: "upgrade_only"}
    fallback = await _choose(sandbox, m, "prefer_native", legacy=True)
    assert fallback.kind == "runbook" and "upgrade_only" in fallback.reason
