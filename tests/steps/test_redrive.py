"""Re-drive (``d365_migration/steps/redrive.py``) and the routing table it shares with the steps."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from d365_migration.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import Tenant, detect, env_for, mine, service


async def test_retry_after_provisioning_timeout_waits_again(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from d365_migration.cli import main

    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])  # the sandbox's own clock: provisioning waits until we move it
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=3600)) as srv:
        env = env_for(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1")
        async with service(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            assert (await svc.purchase(msg)).next_messages == []  # bought; waiting for provisioning
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing"
            # two minutes pass (written into the ledger rather than waited for)
            old = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
            await svc.ledger.save(replace(record, purchase_started_at=old))
            timed_out = await svc.purchase(msg.next_poll())
            assert timed_out.record is not None and timed_out.record.state == "failed"
            assert "provisioning_timeout" in [h["event"] for h in timed_out.record.history]

            # the operator checks the order in Partner Center (still provisioning) and re-drives the record
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            out = io.StringIO()
            assert await asyncio.to_thread(main, ["retry", f"{t.customer_id}/{t.subscription_id}"], out) == 0
            again = await svc.purchase(msg)
            assert again.record is not None and again.record.state == "purchasing", again.record.reason
            now[0] += 3601  # provisioning finishes
            done = await svc.purchase(msg.next_poll())
            assert done.record is not None and done.record.state == "purchased"
    assert len(mine(state, t)) == 1
