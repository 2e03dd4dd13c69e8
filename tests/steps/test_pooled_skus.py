"""Pooled SKUs (issue 10 item 8): the old product SKU is also granted by another subscription of the customer, so
the tool cannot tell who belongs to the retiring one. It blocks before buying, with the counts and the way out; the
operator names who moves (``retry <customer>/<subscription> --users-file``), and exactly those move — never more
than the old quantity — while the other subscription's users keep their licenses."""

from __future__ import annotations

import io
from pathlib import Path

from d365_migration import Settings
from d365_migration.cli import retry
from d365_tooling.sandbox import SandboxServer, SandboxState, seed_world
from tests.steps._world import detect, drive, env_for, msg_for, service


async def test_a_pooled_sku_blocks_then_moves_exactly_the_named_users(state: SandboxState, storage: str,
                                                                       tmp_path: Path) -> None:
    manifest = seed_world(state, customers=3, seed=3, pooled_skus=True)
    (pooled,) = manifest.pooled
    (em,) = [e for e in manifest.expected if e.subscription_id.lower() == pooled.subscription_id.lower()]
    cid, sid = pooled.customer_id, pooled.subscription_id.lower()
    upn = {u["id"].lower(): u["userPrincipalName"] for u in state.users(cid)}
    retiring = {u.lower() for u in em.user_ids}
    others = {u.lower() for u in pooled.holders} - retiring
    assert others and len(retiring) <= em.quantity < len(pooled.holders)
    for customer_id, user_id in manifest.users_without_usage_location:  # not this test's subject
        state.set_usage_location(customer_id, user_id, "US")

    with SandboxServer(state) as srv:
        settings = Settings.from_env(env_for(srv.url, storage))
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, [m for m in report.purchase_messages if m.subscription_id.lower() == sid])
            record = await svc.ledger.get(cid, sid)
            assert record is not None and record.state == "blocked", record
            assert record.reason is not None and "--users-file" in record.reason
            assert f"{len(pooled.holders)} users hold" in record.reason and f"only {em.quantity}" in record.reason
            assert record.cart_id is None and record.order_id is None and record.new_subscription_id is None
            bought_before = len(state.purchases())

            # Too many names: refused, nothing changed.
            too_many = tmp_path / "too-many.txt"
            too_many.write_text("\n".join(upn[u] for u in pooled.holders) + "\n", encoding="utf-8")
            out = io.StringIO()
            assert await retry(settings, f"{cid}/{sid}", out, users_file=str(too_many)) == 2
            assert "at most" in out.getvalue()
            unchanged = await svc.ledger.get(cid, sid)
            assert unchanged is not None and unchanged.state == "blocked" and unchanged.moving_users is None

            users_file = tmp_path / "users.txt"
            users_file.write_text("# the retiring subscription's users\n"
                                  + "\n".join(upn[u].upper() for u in sorted(retiring)) + "\n", encoding="utf-8")
            out = io.StringIO()
            assert await retry(settings, f"{cid}/{sid}", out, users_file=str(users_file)) == 0, out.getvalue()
            await drive(svc, [msg_for("purchase", cid, sid)])
            record = await svc.ledger.get(cid, sid)
    assert record is not None and record.state == "completed", record
    assert len(state.purchases()) == bought_before + 1
    old_sku = pooled.sku_id.lower()
    for user in retiring:
        assert old_sku not in set(state.user_licenses(cid, user)), user
    for user in others:
        assert old_sku in set(state.user_licenses(cid, user)), user  # the other subscription's users keep theirs
    moved = {u["user_id"].lower() for u in state.license_updates() if u["customer_id"].lower() == cid.lower()
             and old_sku in u["removed"]}
    assert moved == retiring
    assert state.subscription(cid, sid)["status"] == "suspended"
    assert state.subscription(cid, pooled.other_subscription_id)["status"] == "active"
