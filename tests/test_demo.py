"""``make demo``'s tenant and report (issue 13): native and runbook customers side by side, and a report that says
which path each migration took and why. (The whole chain over a mixed tenant is ``tests/test_e2e_native.py``.)"""

from __future__ import annotations

import io
from datetime import UTC, datetime

from d365_migration._ledger import MigrationRecord
from d365_tooling.demo import _print_report, demo_native_paths, path_of
from d365_tooling.sandbox import SandboxState, seed_world


def test_the_demo_tenant_mixes_native_and_runbook_customers() -> None:
    manifest = seed_world(SandboxState(), customers=24, seed=7, today=datetime.now(UTC).date())
    paths = demo_native_paths(manifest)
    with_work = {em.customer_id.lower() for em in manifest.expected}
    assert set(paths.values()) == {"transition_with_license_transfer", "transition_only"}
    assert set(paths) < with_work  # some customers have no native path at all
    fixed_by_hand = {cid.lower() for cid, _ in manifest.users_without_usage_location}
    assert fixed_by_hand and not fixed_by_hand & set(paths)  # the blocked-then-fixed story stays on the runbook


def _record(path: str | None, event: str, detail: str) -> MigrationRecord:
    r = MigrationRecord("c1", "s1", customer_name="Contoso", offer_name="Old offer", migration_path=path,
                        replacement_offer_id="P:0001:A", quantity=3, users_moved=2)
    return r.transition("completed", event, detail)


def test_the_report_names_each_path_and_why() -> None:
    native = _record("native_transition", "path_native",
                     "native transition: eligible: transition_with_license_transfer to P:0001:A")
    runbook = _record("runbook", "path_runbook", "no native path: 7: The transition cannot be performed")
    assert path_of(native) == ("native transition", "eligible: transition_with_license_transfer to P:0001:A")
    assert path_of(runbook)[0] == "three-step runbook"
    out = io.StringIO()
    _print_report(out, [native, runbook], [], [], 1.0, path_policy="prefer_native")
    text = out.getvalue()
    assert "MIGRATION_PATH_POLICY=prefer_native" in text
    assert "native transition" in text and "three-step runbook" in text
    assert "transition_with_license_t" in text and "The transition cannot" in text
    assert "paths: {'native transition': 1, 'three-step runbook': 1}" in text
